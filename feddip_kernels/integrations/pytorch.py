"""PyTorch integration: FedDIPSGD, an optimizer for error-feedback training of a pruned model.

The model's parameters hold the *pruned* weights w * m, so forward and backward run at the pruned
point with no copy of the model; the optimizer keeps the dense weights w in its state and updates
them with the gradient taken at the pruned point (error feedback), then rewrites the pruned copy,
all in one fused pass: on the CPU all layers of a parameter group in one call of the public step
(masked_ef_step_many's validator and kernel call, through update.StepLayers, on NumPy views of the
tensors checked once and kept while they stay valid), on a CUDA device in one Triton kernel
(feddip_kernels._triton_kernels) or in the device kernels' torch operations
(feddip_kernels._torch_kernels), as _backend hands them out.
"""

from __future__ import annotations

import math
import numbers
import warnings
from types import ModuleType
from typing import Any, Callable, Iterable, Mapping, Optional, cast, overload

import numpy as np
import torch

from .. import _backend
from .._arrays import as_array
from ..pruning import pack_mask
from ..update import StepLayers

DEVICE_KERNELS = ("auto", "triton", "torch")


def _grad(prm: torch.Tensor) -> torch.Tensor:
    """A stepped parameter's gradient: the step takes only the parameters that have one."""
    return cast(torch.Tensor, prm.grad)


class FedDIPSGD(torch.optim.Optimizer):
    """SGD with masks, error feedback and FedDIP's regulariser lam * sum_l ||w_l * m_l||_p.

    Parameters with a mask (set with `set_masks`) are pruned layers: the parameter holds w * m,
    the optimizer's state["dense"] holds w, and the regulariser applies to them. Parameters without
    a mask (biases, norms) get plain SGD with momentum and weight decay. Momentum follows
    torch.optim.SGD (no dampening, no Nesterov).

    New weights written into a masked parameter in a way torch tracks (`param.copy_(x)` under
    no_grad, as `load_state_dict` does, or `param.data = x`) become its dense weights at the next
    step (or state_dict()); after writes torch does not track (`param.data.copy_(x)`, a NumPy view)
    call `reload_weights`. Edits of the state and groups between steps (a momentum buffer popped or
    replaced, hyperparameters, add_param_group, load_state_dict) are honoured as torch.optim.SGD
    honours them. Call `set_masks` again to change a mask. float32/float64 parameters, mixed in a
    group if need be.

    On the CPU a group's layers step as masked_ef_step_many steps them (update.StepLayers: its
    checks and its one call), in the fused kernel of `backend` ("auto", "native", "numba" or
    "numpy", as every kernel takes it). Parameters on a device step where they
    are, in the kernels that `device_kernels` names: "auto" (the default) steps a group's layers
    (one CUDA device and dtype) in one Triton kernel launch (_triton_kernels), as torch's fused
    SGD steps them, where Triton imports, else each layer in torch operations (the device
    kernels' ef_step); "torch" each layer in torch operations; "triton" the Triton kernel (an
    error where Triton does not import). "torch" and "triton" take every parameter, CPU ones too
    (Triton on CPU tensors only under TRITON_INTERPRET=1): the way to run those paths on a host.
    The torch operations are compiled by torch.compile into one kernel per layer shape when
    `compile` is True, or None (the default) on a CUDA device where compiling works (else, with
    a warning, the uncompiled operations). No step waits for the device.

    `backend="torch"` and `backend="triton"` are the spellings of `device_kernels` before it
    existed: deprecated (DeprecationWarning), they set device_kernels and leave backend "auto".

    Parameters
    ----------
    params : parameters or parameter groups, as torch.optim.SGD takes them.
    lr, momentum, weight_decay, lam : >= 0 (lam: the regulariser's strength; set_lambda changes it).
    p : 1 or 2, the regulariser's norm.
    backend : the host kernels: "auto", "native", "numba" or "numpy".
    compile : compile the per-layer torch operations (None: on CUDA where it works).
    device_kernels : "auto", "triton" or "torch".

    Raises
    ------
    ValueError : a hyperparameter out of range, an unknown backend or device_kernels, or backend
        and device_kernels that disagree.
    RuntimeError : (at a step) device_kernels="triton" where Triton does not import.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 5e-4,
        lam: float = 0.0,
        p: int = 2,
        backend: str = "auto",
        compile: Optional[bool] = None,
        device_kernels: str = "auto",
    ) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0 or lam < 0:
            raise ValueError("lr, momentum, weight_decay and lam must be >= 0")
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p}")
        if backend in DEVICE_KERNELS[1:]:
            warnings.warn(f'FedDIPSGD(backend="{backend}") is deprecated: pass device_kernels="{backend}" '
                          f"(backend names the host kernels, one of {_backend.BACKENDS})", DeprecationWarning,
                          stacklevel=2)
            if device_kernels not in ("auto", backend):
                raise ValueError(f"backend={backend!r} and device_kernels={device_kernels!r} disagree; "
                                 "pass device_kernels only")
            backend, device_kernels = "auto", backend
        if backend not in _backend.BACKENDS:
            raise ValueError(f"backend must be one of {_backend.BACKENDS}, got {backend!r}")
        if device_kernels not in DEVICE_KERNELS:
            raise ValueError(f"device_kernels must be one of {DEVICE_KERNELS}, got {device_kernels!r}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lam=lam, p=p)
        super().__init__(params, defaults)
        self.backend = backend
        self.device_kernels = device_kernels
        self.compile = compile
        if device_kernels == "triton":
            self._triton()  # not installed: say so now

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """torch's add_param_group (which the constructor calls for each group), with FedDIPSGD's
        checks of the parameters and hyperparameters."""
        params = param_group["params"]
        if not isinstance(params, (torch.Tensor, set)):  # a generator (model.parameters()) is read once, here
            params = param_group["params"] = list(params)
        for prm in [params] if isinstance(params, torch.Tensor) else params:
            if isinstance(prm, torch.Tensor):
                if prm.dtype not in (torch.float32, torch.float64):
                    raise TypeError(f"FedDIPSGD needs float32/float64 parameters, got {prm.dtype}")
                if not prm.is_contiguous():
                    raise ValueError("FedDIPSGD needs contiguous parameters")
        for name in ("lr", "momentum", "weight_decay", "lam"):
            v = param_group.get(name, self.defaults.get(name, 0.0))
            if isinstance(v, (bool, torch.Tensor)) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        p = param_group.get("p", self.defaults.get("p", 2))
        if p not in (1, 2):
            raise ValueError(f"p must be 1 or 2, got {p!r}")
        super().add_param_group(param_group)

    def __getstate__(self) -> dict[str, Any]:
        # torch's optimizers pickle (and deep-copy) their state and groups only: the settings
        # travel too; the prepared tables (derived, with device addresses) do not.
        return {**super().__getstate__(), "backend": self.backend, "device_kernels": self.device_kernels,
                "compile": self.compile}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # also load_state_dict's way in, with state and groups only
        self.__dict__.setdefault("backend", "auto")
        self.__dict__.setdefault("device_kernels", "auto")
        self.__dict__.setdefault("compile", None)
        if self.backend in DEVICE_KERNELS[1:]:  # pickled before device_kernels existed
            self.__dict__.update(backend="auto", device_kernels=self.backend)

    def set_lambda(self, lam: float) -> None:
        """Set the regularisation strength lambda_t of every parameter group.

        Parameters
        ----------
        lam : the new strength, >= 0 (the groups' "lam").

        Raises
        ------
        ValueError : a negative lam.
        """
        if lam < 0:
            raise ValueError(f"lam must be >= 0, got {lam}")
        for group in self.param_groups:
            group["lam"] = lam

    @torch.no_grad()
    def set_masks(self, masks: Mapping[torch.Tensor, Any]) -> None:
        """Assign masks (bool tensors or arrays, same shape) to parameters; None removes a mask.
        The dense weights are kept (or taken from the parameter the first time, or when its shape
        or dtype changed since) and the parameter is rewritten as dense * mask.

        Parameters
        ----------
        masks : parameters to their masks, of the parameter's shape: tensors (taken as bool, on the
            parameter's device) or anything NumPy reads as an array (non-zero = kept); None
            removes the parameter's mask (it is rewritten with its dense weights).

        Raises
        ------
        ValueError : a mask of another shape than its parameter, or a parameter that was assigned a
            non-contiguous `.data` since its mask was set.
        """
        self.__dict__["_layout"] = self.__dict__.get("_layout", 0) + 1  # cached layer tables are stale
        for prm, mask in masks.items():
            state = self.state[prm]
            kept = state.get("dense")
            same = kept is not None and (kept.shape, kept.dtype, kept.device) == (prm.shape, prm.dtype, prm.device)
            dense = self._dense(prm) if same else prm.detach().clone()
            if mask is None:
                prm.copy_(dense)
                for key in ("dense", "mask", "norm"):
                    state.pop(key, None)
                self._seen.pop(prm, None)
                continue
            if isinstance(mask, torch.Tensor):
                m = mask.detach().to(device=prm.device, dtype=torch.bool)
            else:
                m = torch.as_tensor(np.asarray(as_array(mask, "mask"), dtype=bool), device=prm.device)
            if m.shape != prm.shape:
                raise ValueError(f"mask shape {tuple(m.shape)} differs from parameter shape {tuple(prm.shape)}")
            state["dense"] = dense
            state["mask"] = m.contiguous()
            prm.copy_(dense * m)
            state["norm"] = None
            self._stamp(prm)

    def dense(self, prm: torch.Tensor) -> torch.Tensor:
        """The dense weights behind a parameter (the parameter itself when it has no mask).

        Weights written into a masked parameter since the last step, in a way torch tracks, are
        taken as its dense weights first (as the next step would take them).

        Parameters
        ----------
        prm : a parameter of this optimizer.

        Returns
        -------
        torch.Tensor : the dense weights w (the optimizer's state["dense"], not a copy), or the
            parameter detached (same memory) when it has no mask.

        Raises
        ------
        ValueError : a masked parameter whose shape, dtype or device changed since its mask was set,
            or that was assigned a non-contiguous `.data`.
        """
        return self._dense(prm)

    @torch.no_grad()
    def reload_weights(self, params: Optional[Iterable[torch.Tensor]] = None) -> None:
        """Take the masked parameters' current values (of `params`, default all) as their dense
        weights unless they are the pruned copy the parameter holds anyway, as a step does by
        itself for writes that torch tracks (`param.copy_(x)` under no_grad, `model.load_state_dict`,
        `param.data = x`). Call it after writing weights in a way torch does not track:
        `param.data.copy_(x)`, `param.data[...] = x`, or through a NumPy view of the memory; a step
        cannot see those (finding them would cost a read of every weight).

        Parameters
        ----------
        params : the parameters to reload, optional (default: every parameter of every group);
            those without a mask are skipped.

        Raises
        ------
        ValueError : a masked parameter whose shape, dtype or device changed since its mask was set,
            or that was assigned a non-contiguous `.data`.
        """
        chosen = [prm for group in self.param_groups for prm in group["params"]] if params is None else list(params)
        for prm in chosen:
            state = self.state.get(prm, {})
            if "dense" in state:
                self._take_weights(prm, state)

    @property
    def _seen(self) -> dict[torch.Tensor, "_Seen"]:
        return self.__dict__.setdefault("_seen_", {})

    def _dense(self, prm: torch.Tensor) -> torch.Tensor:
        state = self.state[prm]
        if "dense" not in state:
            return prm.detach()
        seen = self._seen.get(prm)
        if seen is None or prm._version != seen.version or prm.data_ptr() != seen.ptr:
            self._take_weights(prm, state)
        return state["dense"]

    def _take_weights(self, prm: torch.Tensor, state: dict[str, Any]) -> None:
        """The parameter may have been written from outside since our last step (torch's version
        counter moved, `.data` was assigned, or the caller says so): its values become the dense
        weights, unless they are the pruned copy we keep there anyway (a checkpoint's model state,
        restored before or after the optimizer's)."""
        dense, w = state["dense"], prm.detach()
        if (w.shape, w.dtype, w.device) != (dense.shape, dense.dtype, dense.device):
            raise ValueError(
                f"a masked parameter changed from {tuple(dense.shape)} {dense.dtype} on {dense.device} to "
                f"{tuple(w.shape)} {w.dtype} on {w.device} since its mask was set; set its mask again (set_masks)")
        if not w.is_contiguous():
            raise ValueError("FedDIPSGD needs contiguous parameters (one was assigned a non-contiguous .data)")
        seen = self._seen.get(prm)
        if seen is not None and seen.ptr != prm.data_ptr() and seen.version == prm._version:
            # `.data` assigned, the memory we wrote untouched: new weights unless the same values
            # (torch's vector_to_parameters moves every parameter so)
            new = not _same_values(w, seen.data)
        else:  # written: new weights unless it is the pruned copy we keep there anyway
            mask = state["mask"]
            new = not _same_values(w, dense * mask)
            if new and seen is not None and seen.mask_at is not None and \
                    (seen.mask_at[0] is not mask or seen.mask_at[1] != mask._version):
                # The mask changed since we wrote the copy, under the mask as it was: any pruned
                # copy of the dense weights (each value the dense one or zero) is ours.
                new = not bool(((w == dense) | (w == 0)).all())
        if new:
            dense.copy_(w)  # moves dense's version: the cached norm is stale
        self._stamp(prm, wrote=False)

    def _stamp(self, prm: torch.Tensor, wrote: bool = True) -> None:
        """Remember the parameter as we left it (its version and memory, and with `wrote`, the mask
        of the pruned copy we wrote into it), to see writes from outside."""
        seen = self._seen.get(prm)
        if seen is None:
            seen = self._seen[prm] = _Seen()
        ptr = prm.data_ptr()
        if ptr != seen.ptr:  # a view of the memory we wrote: what `.data = x` is compared with
            seen.data = prm.detach()
        seen.version, seen.ptr = prm._version, ptr
        if wrote:
            mask = self.state[prm].get("mask")
            seen.mask_at = None if mask is None else (mask, mask._version)

    def _valid_norm(self, prm: torch.Tensor, state: dict[str, Any], p: int) -> Any:
        """The layer's ||w * m||_p kept from our last step, or None when anything it depends on
        changed since (dense weights or mask replaced or written, another p)."""
        seen, norm = self._seen.get(prm), state.get("norm")
        if norm is None or seen is None or seen.norm_of is None:
            return None
        dense, mask = state["dense"], state["mask"]
        d, dv, m, mv, q = seen.norm_of
        return norm if d is dense and m is mask and dv == dense._version and mv == mask._version and q == p else None

    def _keep_norm(self, prm: torch.Tensor, state: dict[str, Any], norm: Any, p: int) -> None:
        """After a step: the layer's new norm, and the parameter as we left it."""
        state["norm"] = norm
        self._stamp(prm)
        dense, mask = state["dense"], state["mask"]
        self._seen[prm].norm_of = (dense, dense._version, mask, mask._version, p)

    @torch.no_grad()
    def state_dict(self) -> dict[str, Any]:
        """torch's state_dict, with the dense weights up to date: weights written into a parameter
        since the last step (which that step would take) are taken first.

        Returns
        -------
        dict : torch's optimizer state dict ("state" and "param_groups"); a masked parameter's
            state holds its dense weights ("dense") and its mask ("mask") too.

        Raises
        ------
        ValueError : a masked parameter whose shape, dtype or device changed since its mask was set,
            or that was assigned a non-contiguous `.data`.
        """
        for group in self.param_groups:
            for prm in group["params"]:
                self._dense(prm)
        return super().state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a state saved by state_dict(), in this or another process: the dense weights
        (error feedback) come from it, and the parameters are rewritten as their pruned copy.

        Parameters
        ----------
        state_dict : a state from state_dict() of a FedDIPSGD over parameters of the same groups
            and sizes.

        Raises
        ------
        ValueError : (from torch) a state whose parameter groups differ in number or size from the
            optimizer's.
        """
        super().load_state_dict(state_dict)
        self.__dict__["_layout"] = self.__dict__.get("_layout", 0) + 1
        self._seen.clear()
        with torch.no_grad():
            for group in self.param_groups:
                for prm in group["params"]:
                    state = self.state[prm]
                    for key in ("version", "dense_version"):  # written by versions before 0.2: another process's
                        state.pop(key, None)
                    if "dense" in state:
                        state["mask"] = state["mask"].to(torch.bool).contiguous()
                        state["dense"] = state["dense"].contiguous()
                        state["norm"] = None  # recomputed at the next step, in float64
                        prm.copy_(state["dense"] * state["mask"])
                        self._stamp(prm)

    @overload
    def step(self, closure: None = None) -> None: ...

    @overload
    def step(self, closure: Callable[[], float]) -> float: ...

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One step of every parameter group: each parameter that has a gradient is stepped (the
        others are left as they are), a masked one with error feedback and the regulariser, the
        others in SGD with momentum and weight decay, in the kernels the class docstring describes.

        Parameters
        ----------
        closure : optional; called first, under torch.enable_grad(), to recompute the loss (and
            the gradients), as torch's optimizers call it.

        Returns
        -------
        float or None : the closure's loss, or None without a closure.

        Raises
        ------
        TypeError : a sparse gradient.
        ValueError : a group with nesterov, dampening or maximize set; on the host kernels,
            hyperparameters edited into a group out of range; a masked parameter whose shape, dtype
            or device changed since its mask was set (or that was assigned a non-contiguous
            `.data`); with device_kernels="triton", a group whose parameters do not share one
            device and dtype.
        RuntimeError : device_kernels="triton" where Triton does not import.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            _check_group(group)
            prms = [prm for prm in group["params"] if prm.grad is not None]
            for prm in prms:
                if prm.grad.is_sparse:
                    raise TypeError("FedDIPSGD does not support sparse gradients")
            if not prms:
                continue
            if self._triton_group(group):
                self._triton_steps(gi, group, prms)
            elif self.device_kernels != "auto":  # every parameter in torch operations, CPU ones too
                self._device_steps(group, prms)
            else:
                self._host_steps(gi, group, prms)
        return loss

    @staticmethod
    def _momentum_buffer(prm: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        """A parameter's momentum buffer, made (zeros) at its first step with momentum, or when the
        state's was removed (as torch.optim.SGD then starts one afresh)."""
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = state["momentum_buffer"] = torch.zeros_like(prm, memory_format=torch.contiguous_format)
        return buf

    def _group_key(self, group: dict[str, Any], prms: list[torch.Tensor]) -> tuple[tuple[Any, ...], list[Any]]:
        """What a group's prepared layers (Triton table, host arrays) stay valid for: no new masks or
        restored state since, momentum on or off and p as then, the same parameters and the same
        tensors in their state, at the same addresses (a momentum buffer, dense weights or mask
        removed or replaced from outside is taken at the next step, as torch.optim.SGD takes it).
        Returns the key and the objects whose ids it holds, which the table must keep alive (an id
        is unique only while its object lives)."""
        objs: list[Any] = []
        versions = []  # of the masks: one written in place is packed again (host)
        for prm in prms:
            st = self.state[prm]
            mask = st.get("mask")
            objs += (prm, st.get("momentum_buffer"), st.get("dense"), mask)
            if mask is not None:
                versions.append(mask._version)
        key = (self.__dict__.get("_layout", 0), group["momentum"] != 0, group["p"], tuple(map(id, objs)),
               tuple(0 if t is None else t.data_ptr() for t in objs), tuple(versions))  # `.data` of any assigned
        return key, objs

    def _buffered(self, group: dict[str, Any], prms: list[torch.Tensor]) -> list[dict[str, Any]]:
        """The parameters' states, each with a momentum buffer where the group has momentum."""
        states = [self.state[prm] for prm in prms]
        if group["momentum"] != 0:
            for prm, st in zip(prms, states):
                self._momentum_buffer(prm, st)
        return states

    def _host_steps(self, gi: int, group: dict[str, Any], prms: list[torch.Tensor]) -> None:
        """A group's host layers in at most two calls of the public multi-layer step (one fork and
        join each, not one per layer): the masked layers with the regulariser, then the others.
        The step's layers (update.StepLayers: NumPy views of the dense weights, buffers, pruned
        copies and packed masks, checked by the step's validator) are made once and kept while
        they stay valid (converting and checking them each step would cost more than the step of a
        small layer; benchmarks/RESULTS.md); each step checks the new gradients, norms and hyperparameters. A
        group with layers on a device too steps those in torch operations (_device_steps)."""
        kept = self.__dict__.setdefault("_host_tables", {})
        key, _ = self._group_key(group, prms)
        entry = kept.get(gi)
        if entry is None or entry[0] != key:
            on_device = [_backend.on_device(prm) for prm in prms]
            if any(on_device):
                self._device_steps(group, [prm for prm, dev in zip(prms, on_device) if dev])
                prms = [prm for prm, dev in zip(prms, on_device) if not dev]
                if prms:  # not kept: they are not the whole group
                    self._host_call(group, self._host_layers(group, prms, self._buffered(group, prms)))
                return
            states = self._buffered(group, prms)
            key, objs = self._group_key(group, prms)  # with the buffers just made
            entry = kept[gi] = (key, self._host_layers(group, prms, states), objs)
        self._host_call(group, entry[1])

    def _host_call(self, group: dict[str, Any], prepared: tuple[Any, Any]) -> None:
        masked, plain = prepared
        p = group["p"]
        hyper = dict(lr=group["lr"], weight_decay=group["weight_decay"], p=p, momentum=group["momentum"])
        if masked is not None:
            items, layers = masked
            norms = []
            for prm, st in items:
                self._dense(prm)  # weights written from outside become the dense weights (same storage)
                norms.append(self._valid_norm(prm, st, p))
            new = layers.step([prm.grad.detach().numpy() for prm, _ in items], lam=group["lam"], norms=norms,
                              **hyper)
            for (prm, st), norm in zip(items, new):
                self._keep_norm(prm, st, norm, p)
        if plain is not None:
            items, layers, zeros = plain
            layers.step([prm.grad.detach().numpy() for prm in items], norms=zeros, **hyper)

    def _host_layers(self, group: dict[str, Any], prms: list[torch.Tensor],
                     states: list[dict[str, Any]]) -> tuple[Any, Any]:
        """What _host_call steps: ((masked (prm, state) pairs, their StepLayers) or None, (the
        other parameters, their StepLayers, zero norms) or None)."""
        momentum = group["momentum"]

        def step_layers(items: list[tuple[torch.Tensor, dict[str, Any]]], masked: bool) -> StepLayers:
            bufs = [as_array(st["momentum_buffer"]) for _, st in items] if momentum != 0 else None
            grads = [_grad(prm).detach().numpy() for prm, _ in items]
            if not masked:
                return StepLayers([as_array(prm) for prm, _ in items], grads, momentum_buffers=bufs, momentum=momentum,
                                  backend=self.backend)
            return StepLayers([as_array(st["dense"]) for _, st in items], grads,
                              mask_bits=[self._mask_bits(prm) for prm, _ in items], momentum_buffers=bufs,
                              pruned_outs=[as_array(prm) for prm, _ in items], momentum=momentum, backend=self.backend)

        masked = [(prm, st) for prm, st in zip(prms, states) if "mask" in st]
        plain = [(prm, st) for prm, st in zip(prms, states) if "mask" not in st]
        return ((masked, step_layers(masked, True)) if masked else None,
                ([prm for prm, _ in plain], step_layers(plain, False), [0.0] * len(plain)) if plain else None)

    def _triton(self) -> Optional[ModuleType]:
        """The Triton step (_triton_kernels) where Triton imports; where it does not, None, or with
        device_kernels="triton" an error that says so."""
        module = _backend.triton_step()
        if module is None and self.device_kernels == "triton":
            raise RuntimeError('FedDIPSGD(device_kernels="triton") needs Triton, which does not import here '
                               '(pip install triton); "auto" steps in torch operations without it')
        return module

    def _triton_group(self, group: dict[str, Any]) -> bool:
        """Whether a group steps in the multi-layer Triton kernel: all its parameters on one CUDA
        device with one dtype where Triton imports (device_kernels "auto"), or on any one device
        with device_kernels="triton" (CPU tensors under TRITON_INTERPRET). Otherwise its device
        layers step one by one; with device_kernels="triton" a group that the kernel cannot take
        is an error, not a quiet fallback."""
        params = group["params"]
        if not params or self.device_kernels == "torch" or (self.device_kernels == "auto" and not params[0].is_cuda):
            return False
        if len({(prm.device, prm.dtype) for prm in params}) > 1:
            if self.device_kernels == "triton":
                raise ValueError('FedDIPSGD(device_kernels="triton") steps a group whose parameters share one device '
                                 'and dtype; put the others in groups of their own, or use device_kernels="auto"')
            return False
        return self._triton() is not None

    def _triton_steps(self, gi: int, group: dict[str, Any], prms: list[torch.Tensor]) -> None:
        """A group's layers in one launch of the Triton step (and a small one that adds up the
        layers' norms), replayed as a CUDA graph from the table's second step. The layer table, with
        the addresses, the states and the norms, stays between steps while the layers do (see
        _group_key)."""
        kept = self.__dict__.setdefault("_triton_tables", {})
        key, _ = self._group_key(group, prms)
        entry = kept.get(gi)
        if entry is None or entry[0] != key:
            states = self._buffered(group, prms)
            key, objs = self._group_key(group, prms)  # with the buffers just made
            entry = kept[gi] = (key, self._triton_table(prms, states), objs)
        table, masked, views = entry[1]
        p = group["p"]
        fresh = False  # norms to compute first: a new table, or weights written from outside
        for (prm, st), v in zip(masked, views):
            self._dense(prm)
            fresh |= self._valid_norm(prm, st, p) is not v
        if fresh:
            table.compute_norms(p)
        grads = [g if g.is_contiguous() else g.contiguous() for g in map(_grad, prms)]
        table.step(grads, group["lr"], group["weight_decay"], group["lam"], group["momentum"], p)
        _bump(prms)  # written in place: autograd sees it as it sees torch's own in-place steps
        for (prm, st), v in zip(masked, views):
            self._keep_norm(prm, st, v, p)

    def _triton_table(self, prms: list[torch.Tensor], states: list[dict[str, Any]]) -> tuple[Any, list[Any], list[Any]]:
        """(the Triton step's layer table, the masked (prm, state) pairs, their norms' views in it)."""
        triton = cast(ModuleType, self._triton())  # a Triton group: Triton imports
        table = triton.LayerTable(
            [self._dense(prm) if "mask" in st else prm.detach() for prm, st in zip(prms, states)],
            [st.get("mask") for st in states], [st.get("momentum_buffer") for st in states],
            [prm.detach() if "mask" in st else None for prm, st in zip(prms, states)])
        masked = [(prm, st) for prm, st in zip(prms, states) if "mask" in st]
        return table, masked, [v for v, st in zip(table.views, states) if "mask" in st]

    def _device_steps(self, group: dict[str, Any], prms: list[torch.Tensor]) -> None:
        """Layers stepped one by one in the device kernels' torch operations, where they are: the
        masked ones in ef_step (its norm kept on the device as a 0-d tensor: no wait), the others
        in plain SGD, as torch.optim.SGD makes it."""
        dk = _backend.device_kernels()
        hp: dict[torch.device, torch.Tensor] = {}  # the group's scalars, per device
        p = group["p"]
        for prm in prms:
            state = self.state[prm]
            buf = self._momentum_buffer(prm, state) if group["momentum"] != 0 else None
            if "mask" not in state:
                dk.sgd_step(prm.detach(), _grad(prm), buf, lr=group["lr"], weight_decay=group["weight_decay"],
                            momentum=group["momentum"])
                continue
            if prm.device not in hp:
                hp[prm.device] = dk.hyper(group["lr"], group["weight_decay"], group["lam"], group["momentum"],
                                          prm.device)
            dense = self._dense(prm)
            norm = self._valid_norm(prm, state, p)
            norm = self._ef_step(dk, dense, prm.grad, state["mask"], buf, prm.detach(), hp[prm.device], p, norm)
            self._keep_norm(prm, state, norm, p)

    def _mask_bits(self, prm: torch.Tensor) -> np.ndarray:
        """A host parameter's mask as packed bits (an eighth of the bool mask's traffic in every
        step), packed once per mask: kept beside the state, not in it, so checkpoints keep only the
        bool mask, and packed again whenever the mask tensor is replaced or written."""
        mask = self.state[prm]["mask"]
        cache = self.__dict__.setdefault("_packed_masks", {})
        hit = cache.get(prm)
        if hit is None or hit[0] is not mask or hit[1] != mask._version:
            hit = cache[prm] = (mask, mask._version, pack_mask(mask))
        return hit[2]

    def _ef_step(self, dk: Any, *args: Any) -> torch.Tensor:
        """The device kernels' ef_step, compiled (ef_step_fused) as `compile` says."""
        if not (self.compile or (self.compile is None and args[0].device.type == "cuda")):
            return dk.ef_step(*args)
        try:
            return dk.ef_step_fused(*args)
        except Exception as e:  # noqa: BLE001 - no compiler here (no Triton, no C++ toolchain)
            if self.compile:
                raise
            warnings.warn(f"FedDIPSGD: torch.compile failed ({type(e).__name__}: {e}); stepping with "
                          "uncompiled torch operations", RuntimeWarning, stacklevel=4)
            self.compile = False
            return dk.ef_step(*args)


class _Seen:
    """A masked parameter as the optimizer last left it, to tell edits from outside: its version and
    memory (new weights written or `.data` assigned), a view of that memory (while `.data` points
    elsewhere it keeps the old values, to compare with), and what its kept norm was computed from
    (dense weights and mask, each object and version, and p)."""

    __slots__ = ("version", "ptr", "data", "mask_at", "norm_of")

    def __init__(self) -> None:
        self.version, self.ptr = -1, -1
        self.data: Optional[torch.Tensor] = None
        self.mask_at: Optional[tuple[torch.Tensor, int]] = None  # the mask (and its version) when we left it
        self.norm_of: Optional[tuple[Any, ...]] = None


def _same_values(a: torch.Tensor, b: Optional[torch.Tensor]) -> bool:
    return b is not None and a.shape == b.shape and torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


_UNSUPPORTED = ("nesterov", "dampening", "maximize")


def _check_group(group: dict[str, Any]) -> None:
    """Settings of torch.optim.SGD that FedDIPSGD does not implement are refused, not ignored."""
    for name in _UNSUPPORTED:
        if group.get(name):
            raise ValueError(f"FedDIPSGD does not implement {name} (param_groups has {name}={group[name]!r})")


def _bump(tensors: list[torch.Tensor]) -> None:
    """Advance the tensors' version counters (one call where torch takes a list)."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # torch before list support
        for t in tensors:
            torch.autograd.graph.increment_version(t)
