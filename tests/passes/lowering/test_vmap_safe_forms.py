"""The vmap-safe forms of ops whose vmap rules pin symbolic sizes: the same values as the ops, under vmap."""

import torch

from snlp_compile.passes.lowering.batching import cat_for_vmap, layer_norm_for_vmap


def test_cat_for_vmap_equals_cat_for_equal_and_unequal_parts_and_skips_legacy_empty_ones():
    past, new = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 1, 4)
    for parts in ([past, new], [new, new, new], [torch.tensor([]), new], [torch.tensor([]), past, new]):
        expected = torch.vmap(lambda *ts: torch.cat(ts, dim=-2))(*[p for p in parts if p.numel()])
        fns = [p if p.numel() else None for p in parts]

        def safe(*batched, fns=fns):
            it = iter(batched)
            return cat_for_vmap([next(it) if f is not None else torch.tensor([]) for f in fns], dim=-2)

        torch.testing.assert_close(torch.vmap(safe)(*[p for p in parts if p.numel()]), expected)


def test_layer_norm_for_vmap_equals_layer_norm():
    x, weight, bias = torch.randn(3, 2, 5, 8), torch.randn(8), torch.randn(8)
    expected = torch.nn.functional.layer_norm(x, (8,), weight, bias, 1e-5)
    out = torch.vmap(lambda t: layer_norm_for_vmap(t, (8,), weight, bias, 1e-5))(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
