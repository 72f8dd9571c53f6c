"""Composite-kernel maths: basis, projector, alpha, residual, spec validation (lightning_cheapconv/structure.py)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_cheapconv.structure import (
    StructureSpec,
    basis_pinv,
    composite_basis,
    from_alpha,
    project,
    projector,
    random_residual,
    spec_from_ratios,
    structural_residual,
    to_alpha,
)

# (C, N_h, N_w, c, n_h, n_w): square, non-square, 1x1 (channel only), C=1 (depthwise: spatial only), full size.
SHAPES = [
    (4, 3, 3, 2, 2, 2),
    (3, 3, 3, 3, 1, 1),
    (5, 1, 3, 2, 1, 2),
    (2, 5, 3, 1, 3, 2),
    (6, 1, 1, 3, 1, 1),
    (1, 3, 3, 1, 2, 2),
    (3, 2, 2, 3, 2, 2),
]


def _dense_basis(big_c: int, big_h: int, big_w: int, c: int, n_h: int, n_w: int) -> torch.Tensor:
    """The (C·N_h·N_w) x (c·n_h·n_w) 0/1 matrix A, built box by box (independent of composite_basis)."""
    a = torch.zeros(big_c, big_h, big_w, c, n_h, n_w, dtype=torch.float64)
    box = (big_c - c + 1, big_h - n_h + 1, big_w - n_w + 1)
    for i in range(c):
        for j in range(n_h):
            for k in range(n_w):
                a[i : i + box[0], j : j + box[1], k : k + box[2], i, j, k] = 1.0
    return a.reshape(big_c * big_h * big_w, c * n_h * n_w)


@pytest.mark.parametrize("big,small", [(1, 1), (3, 1), (3, 2), (3, 3), (5, 2), (7, 4)])
def test_composite_basis_columns_are_boxes(big, small):
    a = composite_basis(big, small)
    assert a.shape == (big, small) and a.dtype == torch.float64
    for j in range(small):
        expected = torch.zeros(big, dtype=torch.float64)
        expected[j : j + big - small + 1] = 1.0
        torch.testing.assert_close(a[:, j], expected)
    # Full column rank, so the pseudo-inverse is a left inverse.
    torch.testing.assert_close(basis_pinv(big, small) @ a, torch.eye(small, dtype=torch.float64))
    p = projector(big, small)
    torch.testing.assert_close(p @ p, p)
    torch.testing.assert_close(p, p.T)


def test_composite_basis_rejects_bad_sizes():
    with pytest.raises(ValueError, match="1 <= small <= big"):
        composite_basis(2, 3)
    with pytest.raises(ValueError, match="1 <= small <= big"):
        composite_basis(3, 0)


@pytest.mark.parametrize("shape", SHAPES)
def test_separable_projector_equals_dense_kronecker(shape):
    big_c, big_h, big_w, c, n_h, n_w = shape
    spec = StructureSpec(c, (n_h, n_w))
    torch.manual_seed(0)
    weight = torch.randn(5, big_c, big_h, big_w, dtype=torch.float64)

    dense_p = torch.kron(projector(big_c, c), torch.kron(projector(big_h, n_h), projector(big_w, n_w)))
    a = _dense_basis(*shape)
    # The Kronecker product of the factor projectors is the projector onto span(A) built directly.
    torch.testing.assert_close(dense_p, a @ torch.linalg.pinv(a), atol=1e-10, rtol=0)

    expected = (weight.reshape(5, -1) @ dense_p.T).reshape(weight.shape)
    torch.testing.assert_close(project(weight, spec), expected, atol=1e-12, rtol=0)

    # alpha = A⁺ vec(W) and W = A alpha, mode by mode.
    expected_alpha = (weight.reshape(5, -1) @ torch.linalg.pinv(a).T).reshape(5, c, n_h, n_w)
    torch.testing.assert_close(to_alpha(weight, spec), expected_alpha, atol=1e-12, rtol=0)
    alpha = torch.randn(5, c, n_h, n_w, dtype=torch.float64)
    torch.testing.assert_close(
        from_alpha(alpha, (big_c, big_h, big_w)), (alpha.reshape(5, -1) @ a.T).reshape(weight.shape)
    )


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_projection_idempotent_and_residual_zero(shape, dtype, tol):
    big_c, big_h, big_w, c, n_h, n_w = shape
    spec = StructureSpec(c, (n_h, n_w))
    torch.manual_seed(1)
    weight = torch.randn(6, big_c, big_h, big_w, dtype=dtype)
    once = project(weight, spec)
    assert once.dtype == dtype and once.shape == weight.shape
    torch.testing.assert_close(project(once, spec), once, atol=tol, rtol=tol)
    assert structural_residual(once, spec).item() < 10 * tol
    # The projection is the nearest structured kernel: what it removes is orthogonal to what it keeps.
    removed = weight - once
    assert abs(float((removed * once).sum())) < 10 * tol * float(weight.norm() ** 2)
    # A kernel built from alpha is already structured.
    alpha = torch.randn(6, c, n_h, n_w, dtype=dtype)
    built = from_alpha(alpha, (big_c, big_h, big_w))
    assert structural_residual(built, spec).item() < 10 * tol


def test_reduced_spec_moves_a_random_kernel():
    spec = StructureSpec(2, (2, 2))
    weight = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    assert structural_residual(weight, spec).item() > 0.5
    assert not torch.allclose(project(weight, spec), weight)


@pytest.mark.parametrize(
    "dense_shape,spec",
    [
        ((8, 3, 3), StructureSpec(4, (2, 2))),
        ((8, 3, 3), StructureSpec(8, (2, 2))),
        ((16, 1, 1), StructureSpec(4, (1, 1))),
        ((1, 5, 5), StructureSpec(1, (3, 2))),
        ((32,), StructureSpec(8)),
    ],
)
def test_random_kernel_residual_concentrates(dense_shape, spec):
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(3000, *dense_shape, generator=generator)
    expected = random_residual(dense_shape, spec)
    big = math.prod(dense_shape)
    assert expected == pytest.approx(math.sqrt(1 - spec.num_weights / big))
    got = structural_residual(weight, spec)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(expected, abs=0.02)


@pytest.mark.parametrize("shape", SHAPES)
def test_alpha_round_trip(shape):
    big_c, big_h, big_w, c, n_h, n_w = shape
    spec = StructureSpec(c, (n_h, n_w))
    torch.manual_seed(3)
    alpha = torch.randn(4, c, n_h, n_w, dtype=torch.float64)
    dense = from_alpha(alpha, (big_c, big_h, big_w))
    assert dense.shape == (4, big_c, big_h, big_w)
    torch.testing.assert_close(to_alpha(dense, spec), alpha, atol=1e-12, rtol=0)

    weight = torch.randn(4, big_c, big_h, big_w, dtype=torch.float64)
    torch.testing.assert_close(from_alpha(to_alpha(weight, spec), (big_c, big_h, big_w)), project(weight, spec))


def test_project_is_differentiable():
    spec = StructureSpec(2, (2, 1))
    weight = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w: project(w, spec), (weight,))
    assert torch.autograd.gradcheck(lambda w: structural_residual(w, spec), (weight,))


def test_linear_weights():
    spec = StructureSpec(3)
    torch.manual_seed(4)
    weight = torch.randn(5, 7, dtype=torch.float64)
    projected = project(weight, spec)
    assert projected.shape == (5, 7)
    torch.testing.assert_close(projected, weight @ projector(7, 3).T)
    torch.testing.assert_close(projected, project(weight[:, :, None, None], spec)[:, :, 0, 0])

    alpha = to_alpha(weight, spec)
    assert alpha.shape == (5, 3)
    torch.testing.assert_close(alpha, weight @ basis_pinv(7, 3).T)
    torch.testing.assert_close(from_alpha(alpha, (7,)), projected)
    torch.testing.assert_close(from_alpha(alpha, (7,)), alpha @ composite_basis(7, 3).T)
    assert structural_residual(projected, spec).item() < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("weight_shape", [(6, 4, 3, 3), (6, 9)])
def test_half_precision_keeps_dtype(dtype, weight_shape):
    spec = StructureSpec(2, (2, 2) if len(weight_shape) == 4 else (1, 1))
    torch.manual_seed(5)
    weight = torch.randn(*weight_shape).to(dtype)
    reference = weight.double()
    eps = torch.finfo(dtype).eps

    projected = project(weight, spec)
    assert projected.dtype == dtype and projected.shape == weight.shape
    torch.testing.assert_close(projected.double(), project(reference, spec), atol=4 * eps, rtol=4 * eps)

    alpha = to_alpha(weight, spec)
    assert alpha.dtype == dtype
    torch.testing.assert_close(alpha.double(), to_alpha(reference, spec), atol=4 * eps, rtol=4 * eps)
    dense_shape = weight_shape[1:]
    back = from_alpha(alpha, dense_shape)
    assert back.dtype == dtype and back.shape == weight.shape
    torch.testing.assert_close(back.double(), from_alpha(alpha.double(), dense_shape), atol=8 * eps, rtol=8 * eps)

    residual = structural_residual(weight, spec)
    assert residual.dtype == torch.float32
    assert residual.item() == pytest.approx(structural_residual(reference, spec).item(), abs=10 * eps)


# --- validation -------------------------------------------------------------------------------------------------


def test_spec_properties():
    spec = StructureSpec(channels=16, kernel_size=2)
    assert spec.kernel_size == (2, 2)
    assert spec.num_weights == 64
    assert StructureSpec(3).kernel_size == (1, 1)
    spec.validate((32, 3, 3), layer="x")  # in range: no error


@pytest.mark.parametrize(
    "spec,dense_shape,match",
    [
        (StructureSpec(5, (2, 2)), (4, 3, 3), r"layer1\.0\.conv1: structured channels \(c\)=5.*valid range is 1\.\.4"),
        (StructureSpec(0, (2, 2)), (4, 3, 3), r"layer1\.0\.conv1: structured channels \(c\)=0.*valid range is 1\.\.4"),
        (StructureSpec(2, (4, 2)), (4, 3, 3), r"layer1\.0\.conv1: .*kernel height \(n_h\)=4.*valid range is 1\.\.3"),
        (StructureSpec(2, (1, 2)), (4, 3, 1), r"layer1\.0\.conv1: .*kernel width \(n_w\)=2.*valid range is 1\.\.1"),
        (StructureSpec(2, (0, 1)), (4, 3, 3), r"layer1\.0\.conv1: .*kernel height \(n_h\)=0.*valid range is 1\.\.3"),
        (StructureSpec(9), (8,), r"layer1\.0\.conv1: structured channels \(c\)=9.*valid range is 1\.\.8"),
        (StructureSpec(2.0, (1, 1)), (4, 3, 3), r"layer1\.0\.conv1: structured channels \(c\) must be an int"),
        (StructureSpec(True, (1, 1)), (4, 3, 3), r"layer1\.0\.conv1: structured channels \(c\) must be an int"),
    ],
)
def test_spec_validate_errors_name_layer_and_range(spec, dense_shape, match):
    with pytest.raises(ValueError, match=match):
        spec.validate(dense_shape, layer="layer1.0.conv1")


def test_functions_validate_against_the_weight():
    weight = torch.randn(2, 3, 3, 3)
    for fn in (project, to_alpha):
        with pytest.raises(ValueError, match=r"valid range is 1\.\.3"):
            fn(weight, StructureSpec(4, (2, 2)))
    with pytest.raises(ValueError, match="expected a Linear"):
        project(torch.randn(2, 3, 3, 3, 3, 3), StructureSpec(1))  # rank 3 and 5 are Conv1d and Conv3d weights
    with pytest.raises(ValueError, match="expected a kernel shape"):
        from_alpha(torch.randn(2, 1, 1, 1), (3, 3))
    with pytest.raises(ValueError, match="an int or a pair"):
        StructureSpec(1, (1, 2, 3, 4))  # 1, 2 or 3 sides


@pytest.mark.parametrize(
    "dense_shape,kwargs,expected",
    [
        ((64, 3, 3), {"channel_ratio": 0.5}, StructureSpec(32, (2, 2))),
        ((64, 3, 3), {}, StructureSpec(64, (2, 2))),
        ((64, 3, 3), {"kernel_reduction": 0}, StructureSpec(64, (3, 3))),
        ((64, 5, 5), {"kernel_reduction": 2, "channel_ratio": 0.25}, StructureSpec(16, (3, 3))),
        ((64, 1, 1), {"channel_ratio": 0.5}, StructureSpec(32, (1, 1))),  # 1x1: channel structure only
        ((64, 1, 1), {"kernel_size": (2, 2)}, StructureSpec(64, (1, 1))),  # clamped to the layer's kernel
        ((64, 5, 3), {"kernel_size": (4, 2)}, StructureSpec(64, (4, 2))),
        ((3, 3, 3), {"channel_ratio": 0.01}, StructureSpec(1, (2, 2))),  # at least one channel
        ((3, 3, 3), {"kernel_reduction": 7}, StructureSpec(3, (1, 1))),  # at least 1x1
        ((10,), {"channel_ratio": 0.3}, StructureSpec(3, (1, 1))),
    ],
)
def test_spec_from_ratios(dense_shape, kwargs, expected):
    assert spec_from_ratios(dense_shape, **kwargs) == expected


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"channel_ratio": 0.0}, r"stage2\.conv: channel_ratio=0\.0 is out of range; valid range is \(0, 1\]"),
        ({"channel_ratio": 1.5}, r"stage2\.conv: channel_ratio=1\.5 is out of range; valid range is \(0, 1\]"),
        ({"channel_ratio": -0.5}, r"stage2\.conv: channel_ratio=-0\.5 is out of range"),
        ({"channel_ratio": "half"}, r"stage2\.conv: channel_ratio='half' is not a number"),
        ({"kernel_reduction": -1}, r"stage2\.conv: kernel_reduction=-1 is out of range; valid range is >= 0"),
        ({"kernel_reduction": None}, r"stage2\.conv: kernel_reduction=None is not an int"),
        ({"kernel_size": 0}, r"stage2\.conv: kernel_size=0 is out of range; each side must be >= 1"),
    ],
)
def test_spec_from_ratios_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        spec_from_ratios((16, 3, 3), layer="stage2.conv", **kwargs)
