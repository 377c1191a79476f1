import torch

from tcmlab.config import NetConfig, preset
from tcmlab.nets import MLP, SongUNet, build_net


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def test_ddpmpp_paper_configuration_has_55_7M_parameters():
    net = build_net(preset("cifar10", 1).net, (3, 32, 32))
    assert isinstance(net, SongUNet)
    assert abs(n_params(net) - 55.7e6) < 0.05e6
    # EDM names, so the official checkpoint maps by name
    names = dict(net.named_parameters())
    for k in ("map_layer0.weight", "enc.32x32_conv.weight", "enc.16x16_block0.qkv.weight", "dec.8x8_in0.proj.weight",
              "dec.32x32_aux_conv.weight", "enc.16x16_down.skip.weight"):
        assert k in names, k


def test_small_unet_forward_and_dropout():
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
                   num_blocks=1, attn_resolutions=(4,), dropout=0.3)
    x = torch.randn(3, 1, 8, 8)
    assert net(x, torch.zeros(3)).shape == x.shape
    net.eval()
    assert torch.equal(net(x, torch.zeros(3)), net(x, torch.zeros(3)))


def test_mlp_shapes():
    assert MLP((2,), hidden=16, depth=1)(torch.randn(5, 2), torch.zeros(5)).shape == (5, 2)
    assert MLP((1, 8, 8), hidden=16, depth=1)(torch.randn(5, 1, 8, 8), torch.zeros(5)).shape == (5, 1, 8, 8)


def test_build_net_rejects_unet_on_vectors():
    import pytest
    with pytest.raises(ValueError, match="image data"):
        build_net(NetConfig(arch="ddpmpp"), (2,))


def test_attention_logits_and_softmax_stay_float32_under_bf16_autocast():
    # EDM's AttentionOp computes q·k and the softmax in float32 under mixed precision: record the aten ops that run
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor):
                self.ops.append((func.overloadpacket.__name__, out.dtype))
            return out
    net = SongUNet(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2),
                   num_blocks=1, attn_resolutions=(4,), dropout=0.0).eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), Record() as rec:
        y = net(x, torch.zeros(2))
    names = [n for n, _ in rec.ops]
    softmaxes = [i for i, n in enumerate(names) if n == "_softmax"]
    assert softmaxes and y.dtype == torch.bfloat16  # attention ran, the rest in bf16
    for i in softmaxes:
        logits = max(j for j in range(i) if names[j] in ("bmm", "mm", "matmul"))
        assert rec.ops[i][1] == torch.float32 and rec.ops[logits][1] == torch.float32, rec.ops[logits:i + 1]
    with torch.no_grad():  # fp32 unchanged: the casts are no-ops there
        assert net(x, torch.zeros(2)).dtype == torch.float32
