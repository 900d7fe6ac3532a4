"""Memory layout of the VQ decoders at inference (shared by the VAR VQVAE and the LlamaGen VQ)."""
import torch


def decoder_layout(z: torch.Tensor) -> torch.Tensor:
    """The layout a conv decoder runs in: channels_last (NHWC) for CPU inference, where oneDNN's convolutions and the
    elementwise ops run faster on it (benchmarks/RESULTS.md, "Decoder speed"); unchanged otherwise (training keeps
    the layout autograd was tested with; CUDA is not measured). Values do not depend on the layout beyond float
    rounding of the convolution kernels."""
    if z.device.type == "cpu" and not torch.is_grad_enabled() and z.dim() == 4:
        return z.contiguous(memory_format=torch.channels_last)
    return z
