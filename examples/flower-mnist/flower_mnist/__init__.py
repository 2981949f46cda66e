"""flower-mnist: LeNet-5 on MNIST with Flower, compressed by feddip_kernels."""
