"""Triton sampling kernel against the torch sampler's filters (runtime/sampler.py `_filter`).

The filtered set is checked exactly (the kernel's mask vs a float64 ideal and vs torch's own mask,
differing only at elements within `TOL` of a top-p/min-p boundary, or, for top-p, in a tie group
torch's sort splits arbitrarily); draws are checked for membership, for their frequencies, and for
reproducibility. CPU CI: the interpreter at V <= 500; `gpu` tests: V = 151936.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and not os.environ.get("TRITON_INTERPRET"):
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels", allow_module_level=True)
pytest.importorskip("triton")

from nanoforge.kernels.triton.sampling import sample_tokens  # noqa: E402
from nanoforge.runtime.sampler import _filter  # noqa: E402
from nanoforge.runtime.sampling_params import SamplingParams  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")  # interpreter
DEV = torch.device("cuda" if HAS_CUDA else "cpu")
TOL = 1e-5
# (temperature, top_k, top_p, min_p): greedy, plain, each filter alone, k=1, k off (-1, >= V), combos
CONFIGS = [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.8, 10, 1.0, 0.0), (1.2, 1, 1.0, 0.0), (1.0, -1, 1.0, 0.0),
           (1.0, 10 ** 6, 1.0, 0.0), (0.7, 0, 0.9, 0.0), (1.0, 0, 0.5, 0.0), (1.0, 0, 1.0, 0.1),
           (0.9, 40, 0.95, 0.0), (1.1, 30, 0.8, 0.02), (0.6, 0, 0.99, 0.01), (0.0, 5, 0.5, 0.3)]


def run(logits, cfgs, u=None, **kw):
    cols = [torch.tensor(c, device=logits.device, dtype=torch.float32) for c in zip(*cfgs)]
    u = torch.rand(len(cfgs), device=logits.device) if u is None else u
    return sample_tokens(logits, *cols, u, return_mask=True, **kw)


def tempered(row, t):
    """x * fl(1/T): what torch computes on CUDA for `row / T`, and what the kernel computes."""
    return row * (torch.tensor(1.0, device=row.device) / torch.tensor(t, dtype=torch.float32, device=row.device))


def check_row(row, cfg, mask, tok):
    """mask == the float64 ideal set and == torch's set, but for near-boundary elements."""
    t, k, p, mp = cfg
    if t == 0:
        assert tok == int(row.argmax()), "greedy row != argmax"
        return
    x = tempered(row, t)
    assert mask[tok], f"sampled id {tok} outside the kernel's own filtered set"
    x64 = x.double()
    if 0 < k < len(x):
        x64 = x64.masked_fill(x < torch.topk(x, k).values[-1], float("-inf"))
    prob = torch.softmax(x64, -1)
    rel = prob / prob.max()
    s, order = torch.sort(x64, descending=True)
    excl = torch.cumsum(prob[order], 0) - prob[order]
    gt = excl[torch.searchsorted(-s, -s)]  # mass strictly above each value (ties: the group's first)
    mass_gt = torch.empty_like(gt).scatter_(0, order, gt)
    ideal = torch.isfinite(x64) & (rel >= mp) & ((mass_gt < p) | (p >= 1))
    edge = (((mass_gt - p).abs() < TOL) & (p < 1)) | (((rel - mp).abs() < TOL * mp) & (mp > 0))
    bad = (mask ^ ideal) & ~edge
    assert not bad.any(), f"{cfg}: {int(bad.sum())} ids differ from the ideal set, e.g. {bad.nonzero()[:5].tolist()}"
    ref = ~torch.isinf(_filter(row / t, SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp)))
    tie = torch.zeros_like(mask)
    if p < 1:  # top-p ties straddling the cutoff: torch keeps an arbitrary part of the group, we keep it whole
        tie = mask & ~ref & (x == x[mask].min())
    bad = (mask ^ ref) & ~edge & ~tie
    assert not bad.any(), f"{cfg}: {int(bad.sum())} ids differ from torch's set, e.g. {bad.nonzero()[:5].tolist()}"


def check_batch(logits, cfgs, **kw):
    tok, mask = run(logits, cfgs, **kw)
    assert tok.dtype == torch.int64 and tok.shape == (len(cfgs),)
    for i, cfg in enumerate(cfgs):
        check_row(logits[i], cfg, mask[i], int(tok[i]))
    return tok


# ---- interpreter-sized (CPU CI), fp32 --------------------------------------------------------------

@pytest.mark.parametrize("v,block", [(500, None), (300, 64)])
def test_filtered_set_matches_torch(v, block):
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(len(CONFIGS), v, generator=g) * 2).to(DEV)
    logits[4, ::7] = float("-inf")  # masked vocab entries
    check_batch(logits, CONFIGS, block=block)


def test_strided_rows_and_ties():
    base = torch.tensor([3.0, 1.0, 3.0, 0.0, 3.0, 1.0, -2.0, 1.0, 3.0, -1.0])  # 4-way tie at the top
    wide = torch.zeros(4, 16)
    wide[:, :10] = base
    logits = wide.to(DEV)[:, :10]  # row stride 16
    cfgs = [(1.0, 2, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (1.0, 0, 0.5, 0.0), (0.0, 0, 1.0, 0.0)]
    tok, mask = run(logits, cfgs)
    top = base == 3
    assert torch.equal(mask[0].cpu(), top)  # k=2 inside a 4-way tie: the whole tie survives, as in torch
    assert torch.equal(mask[1].cpu(), base >= 1)  # k=5 lands on the 3-way tie at 1
    assert torch.equal(mask[2].cpu(), top)  # top-p cutoff inside the tie group: all of it
    assert int(tok[3]) == 0  # greedy: the first maximum, as torch.argmax
    for i, cfg in enumerate(cfgs):
        check_row(logits[i], cfg, mask[i], int(tok[i]))


def test_many_ties_random_settings():
    g = torch.Generator().manual_seed(11)
    logits = (torch.randn(12, 200, generator=g) * 4).round() / 2  # ~25 distinct values: ties everywhere
    cfgs = [(float(t), int(k), float(p), float(mp)) for t, k, p, mp in zip(
        torch.rand(12, generator=g) * 1.5 + 0.3, torch.randint(-1, 60, (12,), generator=g),
        torch.rand(12, generator=g) * 0.9 + 0.1, (torch.rand(12, generator=g) - 0.5).clamp(min=0) * 0.4)]
    check_batch(logits.to(DEV), cfgs)


def test_frequencies_follow_the_filtered_softmax():
    """Stratified draws u = (i + 1/2)/N through the inverse CDF: each id must be drawn N * p +- 1
    times (tighter than a chi-square test on N random draws, and deterministic)."""
    n = 64
    row = torch.tensor([2.0, 1.7, 1.5, 1.0, 0.4, -0.5, -1.0, -3.0])
    cfg = (0.8, 6, 0.97, 0.1)  # top-k drops 2 ids, min-p 1, top-p 1 more
    ref = torch.softmax(_filter(row / cfg[0], SamplingParams(temperature=0.8, top_k=6, top_p=0.97, min_p=0.1)), -1)
    assert 3 <= int((ref > 0).sum()) <= 5
    u = ((torch.arange(n) + 0.5) / n).to(DEV)
    tok, _ = run(row.to(DEV).expand(n, -1), [cfg] * n, u=u)
    counts = torch.bincount(tok.cpu(), minlength=8).double()
    assert counts[ref == 0].sum() == 0, "a filtered-out id was drawn"
    assert (counts - n * ref.double()).abs().max() <= 1.0 + 1e-6, (counts.tolist(), (n * ref).tolist())


def test_same_randomness_same_ids_whatever_the_batch():
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 200, generator=g).to(DEV)
    cfgs = [(1.0, 0, 0.9, 0.0), (0.7, 20, 1.0, 0.05), (0.0, 0, 1.0, 0.0), (1.5, 0, 1.0, 0.0)]
    u = torch.rand(4, generator=g).to(DEV)
    batch, _ = run(logits, cfgs, u=u)
    again, _ = run(logits, cfgs, u=u)
    assert torch.equal(batch, again)
    for i in (0, 1, 3):
        alone, _ = run(logits[i:i + 1], cfgs[i:i + 1], u=u[i:i + 1])
        assert int(alone) == int(batch[i])
    other = logits.clone()
    other[1:] = torch.randn(3, 200, generator=g).to(DEV)  # row 0 with different neighbours
    assert int(run(other, cfgs, u=u)[0][0]) == int(batch[0])


def test_empty_batch():
    assert sample_tokens(torch.empty(0, 50, device=DEV), *[torch.empty(0, device=DEV)] * 5).shape == (0,)


# ---- GPU: V = 151936, CUDA graphs --------------------------------------------------------------------

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
QWEN_V = 151936


@gpu
@needs_cuda
@pytest.mark.parametrize("b", [1, 64, 256])
def test_gpu_filtered_set_large_vocab(b):
    g = torch.Generator(device=DEV).manual_seed(b)
    scale = torch.linspace(1, 6, b, device=DEV)[:, None]  # flat to peaked distributions
    logits = torch.randn(b, QWEN_V, generator=g, device=DEV) * scale
    cfgs = [CONFIGS[(i * 7 + 1) % len(CONFIGS)] for i in range(b)] if b > 1 else [(0.7, 50, 0.9, 0.0)]
    check_batch(logits, cfgs)


@gpu
@needs_cuda
def test_gpu_frequencies_chi_square():
    v, n = 64, 200_000
    row = torch.randn(v, generator=torch.Generator().manual_seed(0)) * 1.5
    cfg = (0.9, 40, 0.95, 0.01)
    ref = torch.softmax(_filter(row / 0.9, SamplingParams(temperature=0.9, top_k=40, top_p=0.95, min_p=0.01)), -1)
    tok, _ = run(row.to(DEV).expand(n, -1), [cfg] * n)
    counts = torch.bincount(tok.cpu(), minlength=v).double()
    assert counts[ref == 0].sum() == 0
    keep = ref > 0
    exp = n * ref.double()[keep]
    chi2 = float(((counts[keep] - exp) ** 2 / exp).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)  # ~6 sigma


@gpu
@needs_cuda
def test_gpu_cuda_graph_replay():
    b = 64
    logits = torch.randn(b, QWEN_V, device=DEV) * 3
    cfgs = [CONFIGS[i % len(CONFIGS)] for i in range(b)]
    cols = [torch.tensor(c, device=DEV, dtype=torch.float32) for c in zip(*cfgs)]
    u = torch.rand(b, device=DEV)
    eager = sample_tokens(logits, *cols, u)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = sample_tokens(logits, *cols, u)
    graph.replay()
    assert torch.equal(out, eager)
    u.copy_(torch.rand(b, device=DEV))
    logits.copy_(torch.randn(b, QWEN_V, device=DEV) * 3)
    graph.replay()
    assert torch.equal(out, sample_tokens(logits, *cols, u))
