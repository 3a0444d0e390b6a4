import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aa_detection.layers import AAConv2d, attention_depths
from aa_detection.layers.kernel import kernel_available

from test_relative_attention import brute_force


@pytest.mark.parametrize("downsample", [1, 2])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [(7, 7), (5, 9), (1, 6), (8, 3), (1, 1)])
def test_output_shape_matches_convolution(stride, size, downsample):
    layer = AAConv2d(16, 32, 3, stride=stride, num_heads=4, key_depth=8, value_depth=8,
                     attention_downsample=downsample)
    x = torch.randn(2, 16, *size)
    expected = F.conv2d(x, torch.zeros(32, 16, 3, 3), stride=stride, padding=1).shape
    assert layer(x).shape == expected


@pytest.mark.parametrize("impl", ["naive", "fused", "auto"])
def test_same_layer_runs_on_two_sizes_with_same_embeddings(impl):
    """One table of 2 * 8 - 1 rows serves a 3x5 and an 11x6 map: an offset's embedding is its row, offsets
    beyond +-7 take the edge row (the paper's formula with the table so extended, one pair at a time)."""
    torch.manual_seed(0)
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, max_relative_size=8, impl=impl).eval()
    nn.init.normal_(layer.attn_out.weight)
    assert layer.rel_h.shape == (15, 2) and layer.rel_w.shape == (15, 2)

    def extended(table, size):  # row o + size - 1 for every offset o of the map
        return torch.stack([table[min(max(o, -7), 7) + 7] for o in range(1 - size, size)])

    for H, W in ((3, 5), (11, 6)):
        x = torch.randn(1, 8, H, W)
        q, k, v = layer.split_heads(x)
        attn = brute_force(q, k, v, extended(layer.rel_h, H), extended(layer.rel_w, W)).float()
        ref = layer.attn_out(attn.permute(0, 1, 4, 2, 3).reshape(1, 4, H, W))
        with torch.no_grad():
            out = layer(x)
        assert out.shape == (1, 16, H, W)
        assert torch.allclose(out[:, 16 - 4:], ref, atol=1e-5), (H, W)


def test_relative_off_equals_content_only_attention():
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=6, relative=False)
    assert layer.rel_h is None and layer.rel_w is None
    x = torch.randn(2, 8, 5, 6)
    out = layer(x)
    conv = F.conv2d(x, layer.weight, padding=1)
    q, k, v = (t.reshape(2, 2, -1, 30) for t in layer.qkv(x).split([4, 4, 6], dim=1))  # (B, Nh, d, HW)
    weights = torch.softmax(q.transpose(2, 3) @ k / math.sqrt(2), dim=-1)  # (B, Nh, HW, HW)
    attn = (weights @ v.transpose(2, 3)).transpose(2, 3).reshape(2, 6, 5, 6)  # heads concatenated
    ref = torch.cat([conv, layer.attn_out(attn)], dim=1)
    assert torch.allclose(out, ref, atol=1e-5)


def test_stride_two_attends_over_pooled_input():
    layer = AAConv2d(4, 8, stride=2, num_heads=1, key_depth=2, value_depth=2, relative=False)
    x = torch.randn(1, 4, 5, 7)
    pooled = layer.attention_input(x)
    assert pooled.shape[-2:] == (3, 4)
    assert torch.allclose(pooled[0, :, 0, 0], x[0, :, :2, :2].mean(dim=(1, 2)))
    assert torch.allclose(pooled[0, :, 2, 3], x[0, :, 4, 6])  # a corner window holds one pixel


@pytest.mark.parametrize("impl", ["naive", "fused", "kernel", "auto"])
@pytest.mark.parametrize("stride", [1, 2])
def test_downsampled_attention_is_the_plain_layer_on_the_pooled_map_upsampled(stride, impl):
    """attention_downsample=2: the convolution channels are untouched; the attention channels are those of
    the same layer without downsampling run on the input pooled 2x2 once more, upsampled bilinearly."""
    if impl == "kernel" and not kernel_available():
        pytest.skip("aa_detection._C is not built")
    torch.manual_seed(0)
    layer = AAConv2d(8, 16, stride=stride, num_heads=2, key_depth=4, value_depth=6, attention_downsample=2,
                     max_relative_size=6, impl=impl)
    plain = AAConv2d(8, 16, stride=stride, num_heads=2, key_depth=4, value_depth=6, max_relative_size=6,
                     impl="naive")
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(2, 8, 11, 14)
    out = layer(x)
    conv_size = out.shape[-2:]
    assert torch.equal(out[:, :10], F.conv2d(x, layer.weight, stride=stride, padding=1))
    pooled_attention = plain(F.avg_pool2d(x, 2, 2, ceil_mode=True))[:, 10:]
    assert pooled_attention.shape[-2:] == layer.attention_size(*conv_size)
    expected = F.interpolate(pooled_attention, size=conv_size, mode="bilinear", align_corners=False)
    assert torch.allclose(out[:, 10:], expected, atol=1e-5)


def test_downsampling_divides_the_attention_flops():
    plain = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4)
    pooled = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, attention_downsample=2)
    output = torch.empty(1, 16, 16, 24)
    hw, pooled_hw = 16 * 24, 8 * 12
    core = lambda pixels, h, w: 2 * (pixels * pixels * (2 + 2) + pixels * (h + w) * 2)  # noqa: E731
    assert plain.attention_flops(output) == core(hw, 16, 24)
    assert pooled.attention_flops(output) == core(pooled_hw, 8, 12)


def test_attention_gain_starts_the_attention_small_and_alive_behind_a_relu():
    """The attention channels' norm weight starts at attention_gain: outputs small but not zero, so a
    following ReLU passes a gradient to every row of the projections; a gain of 0 is refused."""
    norm = nn.BatchNorm2d(16)
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, norm=norm, attention_gain=0.1)
    assert torch.equal(norm.weight[12:], torch.full((4,), 0.1)) and torch.equal(norm.weight[:12], torch.ones(12))
    out = layer(torch.randn(2, 8, 6, 7))
    assert 0 < out[:, 12:].std() < 0.2 and 0.8 < out[:, :12].std() < 1.2
    torch.relu(out).sum().backward()
    for part in (layer.qkv, layer.attn_out):
        assert (part.weight.grad.flatten(1).abs().sum(dim=1) > 0).all()
    with pytest.raises(ValueError, match="attention_gain"):
        AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, attention_gain=0.0)


def test_attention_norm_normalises_the_branches_apart():
    """With attention_norm, `norm` covers the Fout - dv convolution channels and attention_norm the dv
    attention channels, each over its own channels, as one per-channel norm over the concatenation would."""
    torch.manual_seed(0)
    split = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, norm=nn.BatchNorm2d(12),
                     attention_norm=nn.BatchNorm2d(4), attention_gain=0.5)
    whole = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, norm=nn.BatchNorm2d(16), attention_gain=0.5)
    whole.load_state_dict({k: v for k, v in split.state_dict().items() if not k.startswith(("norm.", "attention_norm."))},
                          strict=False)
    x = torch.randn(2, 8, 6, 7)
    assert torch.allclose(split(x), whole(x), atol=1e-6)
    assert torch.equal(split.attention_norm.weight, torch.full((4,), 0.5))


def test_gradients_reach_every_parameter():
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, norm=nn.BatchNorm2d(16), activation=nn.ReLU())
    layer(torch.randn(2, 8, 6, 7)).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("impl", ["fused", "flex", "kernel"])
def test_implementations_agree_in_the_layer(impl):
    """Each path against naive through the whole layer: outputs, and gradients where it trains on the CPU."""
    if impl == "kernel" and not kernel_available():
        pytest.skip("aa_detection._C is not built")
    torch.manual_seed(0)
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, impl="naive")
    layer.requires_grad_(impl != "flex")  # FlexAttention trains on CUDA only
    x = torch.randn(2, 8, 9, 4)
    outputs = []
    for path in ("naive", impl):
        layer.impl = path
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters())) if impl != "flex" else ()
        outputs.append((out, grads))
    (ref, ref_grads), (out, grads) = outputs
    assert torch.allclose(out, ref, atol=1e-5)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, rtol=1e-4, atol=1e-5)


def test_depths_from_ratios():
    assert attention_depths(128, 8, 0.2, 0.1) == (24, 16)
    assert attention_depths(256, 8, 0.2, 0.1) == (48, 24)
    assert attention_depths(512, 8, 0.2, 0.1) == (104, 48)
    assert attention_depths(16, 8, 0.2, 0.1) == (8, 8)  # at least one dimension per head
    layer = AAConv2d(64, 256, num_heads=8, kappa=0.2, upsilon=0.1)
    assert (layer.key_depth, layer.value_depth) == (48, 24)
    assert layer.weight.shape == (256 - 24, 64, 3, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_heads=3, key_depth=8, value_depth=6), "key_depth"),
        (dict(num_heads=4, key_depth=8, value_depth=6), "value_depth"),
        (dict(num_heads=4, key_depth=8, value_depth=32), "out_channels"),
        (dict(kernel_size=2), "kernel_size"),
        (dict(stride=3), "stride"),
        (dict(num_heads=0), "num_heads"),
        (dict(impl="cuda"), "impl"),
    ],
)
def test_invalid_settings_raise_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AAConv2d(16, 32, **kwargs)


@pytest.mark.parametrize("impl", ["naive", "fused"])
def test_training_after_inference_at_the_same_size(impl):
    layer = AAConv2d(8, 16, num_heads=2, key_depth=4, value_depth=4, impl=impl)
    x = torch.randn(1, 8, 5, 7)
    with torch.inference_mode():
        expected = layer(x)
    out = layer(x)  # reuses what the inference call cached for this size
    out.sum().backward()
    assert torch.allclose(out, expected) and layer.rel_h.grad is not None


def test_kept_attention_is_the_layers_softmax():
    layer = AAConv2d(8, 16, stride=2, num_heads=2, key_depth=4, value_depth=4).eval()
    x = torch.randn(2, 8, 9, 6)
    expected = layer(x)
    with layer.recording_attention() as maps:
        out = layer(x)
    layer(x)  # after the block: not recorded
    assert len(maps) == 1
    weights = maps[0]
    assert torch.allclose(out, expected, atol=1e-5)  # same output as the usual path
    q, k, v = layer.split_heads(layer.attention_input(x))  # the maps are the weights that made the output
    attn = (weights.reshape(2, 2, 15, 15) @ v.reshape(2, 2, 15, 2)).reshape(2, 2, 5, 3, 2)
    projected = layer.attn_out(attn.permute(0, 1, 4, 2, 3).reshape(2, 4, 5, 3))
    assert torch.allclose(out[:, -4:], projected, atol=1e-5)
    assert weights.shape == (2, 2, 5, 3, 5, 3)
    assert torch.allclose(weights.sum(dim=(-2, -1)), torch.ones(2, 2, 5, 3))
    assert not torch.allclose(weights[0, 0, 0, 0], weights[0, 0, 4, 2])  # queries attend differently


@pytest.mark.parametrize("impl", ["auto", "naive"])
def test_bfloat16_autocast_matches_float32(impl):
    """Under CPU autocast (bfloat16) the layer's forward and backward stay close to fp32."""
    torch.manual_seed(0)
    layer = AAConv2d(16, 32, num_heads=4, key_depth=8, value_depth=8, impl=impl)
    x = torch.randn(2, 16, 6, 9)
    grad = torch.randn(2, 32, 6, 9)
    ref = layer(x)
    ref_grads = torch.autograd.grad(ref, list(layer.parameters()), grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out.float(), list(layer.parameters()), grad)
    assert (out.float() - ref).abs().max() < 0.05 * ref.abs().max()
    for g, r in zip(grads, ref_grads):
        assert (g.float() - r).norm() < 0.05 * r.norm()
