"""Context parallelism (lesson 10): the split and the work it gives each rank; ring attention and
Ulysses equal to full attention on one process, outputs and gradients, causal or not, zigzag or
contiguous, on 2 and 4 ranks; the ring's transfers posted before its arithmetic; the bytes each
sends; the pixel transformer split over 2 ranks equal to one process; the one-line refusals.

Two launches (2 ranks, 4 ranks), each checking every case inside one worker function."""

import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import course_utils as cu
from course_utils import context_parallel
from course_utils.context_parallel import ring, split, ulysses

B, HEADS, T, D = 2, 4, 24, 8  # T divides into 2 x 4 zigzag chunks: cp = 2 and 4 both run
METHODS = ("ring", "ring written out", "ulysses")  # the ring through the CPU kernel, or not
CASES = [
    (method, layout, causal)
    for method in METHODS
    for layout in ("zigzag", "contiguous")
    for causal in (True, False)
]
# float64 rounding (2e-16) over sums of T terms and a few merges stays below 1e-13; a wrong mask,
# block or merge changes outputs and gradients by 1e-2 or more.
TIGHT = dict(rtol=1e-11, atol=1e-11)


def attention_inputs():
    """q, k, v of the whole sequence, and the cotangent of the output, (B, HEADS, T, D)."""
    g = torch.Generator().manual_seed(0)
    return [torch.randn(B, HEADS, T, D, generator=g, dtype=torch.float64) for _ in range(4)]


def images():
    g = torch.Generator().manual_seed(1)
    X = torch.rand(4, 1, 28, 28, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 10, (4,), generator=g)


def pixel_model():
    return cu.models.build("pixels", seed=0).double()


def sent(counter: dict, before: dict) -> int:
    return counter["bytes"] - before["bytes"]


def attention(method: str):
    ring.FUSED = method != "ring written out"
    return ring.ring_attention if method.startswith("ring") else ulysses.ulysses_attention


def attention_cases(group) -> dict:
    """Every case's output and input gradients on this rank, its positions, the bytes its
    forward sent and the ring's spans."""
    cp, rank = dist.get_world_size(group), dist.get_rank(group)
    q, k, v, w = attention_inputs()
    found = {}
    for method, layout, causal in CASES:
        held = split.positions(T, cp, rank, layout)
        local = [x[:, :, held].clone().requires_grad_() for x in (q, k, v)]
        ring.LOG.clear()
        before = dict(ring.COMM), dict(ulysses.COMM)
        out = attention(method)(*local, held, group, causal=causal)
        forward_bytes = sent(ring.COMM, before[0]) + sent(ulysses.COMM, before[1])
        (out * w[:, :, held]).sum().backward()
        found[method, layout, causal] = {
            "positions": held,
            "out": out.detach(),
            "grads": [x.grad for x in local],
            "forward_bytes": forward_bytes,
            "spans": list(ring.LOG),
        }
    ring.FUSED = True
    return found


def worker(with_model: bool) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    group = dist.group.WORLD
    result = {"attention": attention_cases(group)}
    cp, rank = dist.get_world_size(), dist.get_rank()
    q = torch.zeros(B, 2 * cp - 1, T // cp, D)  # heads that don't divide among the ranks
    try:  # refused on every rank, before any message
        ulysses.ulysses_attention(q, q, q, split.positions(T, cp, rank), group)
    except ValueError as err:
        result["refused"] = str(err)
    if with_model:
        mesh = init_device_mesh("cpu", (cp,), mesh_dim_names=("cp",))
        X, y = images()
        for layout, method in (("zigzag", "ring"), ("contiguous", "ring"), ("zigzag", "ulysses")):
            model = context_parallel.apply(pixel_model(), mesh, layout, method)
            logits = model(X)
            F.cross_entropy(logits, y).backward()
            grads = {n: p.grad for n, p in model.named_parameters()}
            result[layout, method] = (logits.detach(), grads)
    return result


@pytest.fixture(scope="module")
def two_ranks():
    return cu.launch.run(worker, 2, True, device="cpu", threads=1)


@pytest.fixture(scope="module")
def four_ranks():
    with warnings.catch_warnings():  # 4 workers on 2 cores take turns: slow, still exact
        warnings.filterwarnings("ignore", "4 workers on")
        return cu.launch.run(worker, 4, False, device="cpu", threads=1, oversubscribe=True)


def full_attention(causal: bool):
    """SDPA over the whole sequence on one process: the output and dq, dk, dv."""
    q, k, v, w = attention_inputs()
    for x in (q, k, v):
        x.requires_grad_()
    out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    (out * w).sum().backward()
    return out.detach(), [q.grad, k.grad, v.grad]


def assemble(pieces: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """The whole (B, HEADS, T, D) tensor from each rank's (positions, local part); every
    position must come exactly once."""
    whole = torch.full((B, HEADS, T, D), float("nan"), dtype=torch.float64)
    for held, part in pieces:
        assert torch.isnan(whole[:, :, held]).all(), "a position held twice"
        whole[:, :, held] = part
    assert not torch.isnan(whole).any(), "a position nobody holds"
    return whole


@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])
def test_ring_and_ulysses_equal_full_attention_forward_and_backward(ranks, request):
    results = request.getfixturevalue(ranks)
    for method, layout, causal in CASES:
        case = [r["attention"][method, layout, causal] for r in results]
        out, grads = full_attention(causal)
        name = f"{method} {layout} causal={causal} on {len(results)} ranks"
        torch.testing.assert_close(
            assemble([(c["positions"], c["out"]) for c in case]), out, **TIGHT, msg=name
        )
        for i, what in enumerate(("dq", "dk", "dv")):
            whole = assemble([(c["positions"], c["grads"][i]) for c in case])
            torch.testing.assert_close(whole, grads[i], **TIGHT, msg=f"{what}, {name}")


@pytest.mark.parametrize("ranks", ["two_ranks", "four_ranks"])
def test_bytes_sent_forward_follow_the_formulas(ranks, request):
    results = request.getfixturevalue(ranks)
    cp = len(results)
    activation = B * (T // cp) * HEADS * D * 8  # one (B, T/cp, dim) tensor in float64
    for result in results:
        for (method, _, _), case in result["attention"].items():
            if method.startswith("ring"):  # K and V of every other rank
                assert case["forward_bytes"] == (cp - 1) * 2 * activation
            else:  # q, k, v and the output, each keeping 1/cp at home
                assert case["forward_bytes"] == 4 * (cp - 1) * activation // cp


def test_each_transfer_is_posted_before_the_block_it_hides_behind(four_ranks):
    for rank, result in enumerate(four_ranks):
        for (method, layout, causal), case in result["attention"].items():
            if not method.startswith("ring"):
                continue
            for phase in ("forward", "backward"):
                spans = [s for s in case["spans"] if s.phase == phase]
                for step in range(len(four_ranks) - 1):  # every step with a next block
                    post, block, wait = (
                        next(s for s in spans if s.kind == kind and s.step == step)
                        for kind in ("post", "block", "wait")
                    )
                    where = f"rank {rank}, {phase} step {step}, {layout} causal={causal}"
                    assert post.stop <= block.start, where  # the next block already on its way
                    assert block.stop <= wait.start, where  # waited for only after arithmetic
            blocks = [s for s in case["spans"] if s.phase == "forward" and s.kind == "block"]
            assert [s.step for s in blocks] == [0, 1, 2, 3]


def test_ulysses_refuses_heads_that_do_not_divide(four_ranks):
    for result in four_ranks:
        assert "7 heads do not divide among 4 context-parallel ranks" in result["refused"]


@pytest.mark.parametrize(
    "setting", [("zigzag", "ring"), ("contiguous", "ring"), ("zigzag", "ulysses")]
)
def test_the_pixel_model_split_over_two_ranks_equals_one_process(two_ranks, setting):
    model = pixel_model()
    X, y = images()
    logits = model(X)
    F.cross_entropy(logits, y).backward()
    for result in two_ranks:  # every rank of the group computes the whole logits
        torch.testing.assert_close(result[setting][0], logits.detach(), **TIGHT)
    for name, param in model.named_parameters():  # the data-parallel step's average over cp
        mean = sum(result[setting][1][name] for result in two_ranks) / len(two_ranks)
        torch.testing.assert_close(mean, param.grad, **TIGHT, msg=name)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_every_position_is_held_once_in_increasing_order(cp, layout):
    held = [split.positions(48, cp, rank, layout) for rank in range(cp)]
    assert torch.equal(torch.cat(held).sort().values, torch.arange(48))
    for rank, positions in enumerate(held):
        assert len(positions) == 48 // cp and bool((positions.diff() > 0).all())
        if cp > 1:
            assert split.layout_of(positions, cp, rank) == layout
    assert split.positions(8, 2, 0).tolist() == [0, 1, 6, 7]  # zigzag: front and back
    assert split.positions(8, 2, 1).tolist() == [2, 3, 4, 5]


def test_splits_that_do_not_divide_are_refused():
    with pytest.raises(ValueError, match="10 tokens does not divide into 6 equal chunks"):
        split.positions(10, 3, 0, "zigzag")
    with pytest.raises(ValueError, match="does not divide into 4"):
        split.positions(10, 4, 0, "contiguous")
    assert split.positions(12, 3, 2, "contiguous").tolist() == [8, 9, 10, 11]
    with pytest.raises(ValueError, match="neither a zigzag nor a contiguous split"):
        split.layout_of(torch.tensor([1, 3, 5]), 2, 0)


def test_causal_work_piles_on_the_last_contiguous_rank_and_zigzag_levels_it():
    contiguous, zigzag = split.work(48, 4, "contiguous"), split.work(48, 4, "zigzag")
    assert contiguous == [144 * (r + 1) for r in range(4)]  # chunk 12: rank r sees r + 1 chunks
    assert zigzag == [9 * 36] * 4  # chunks of 6: 3 halves on the diagonal block, 2 on the others
    visible = 48 * 49 // 2  # every (query, key) pair the causal mask keeps is computed
    assert sum(zigzag) >= visible and sum(contiguous) >= visible
    assert split.work(48, 4, "zigzag", causal=False) == [48 * 48 // 4] * 4


def test_bad_context_parallel_settings_are_one_line():
    error = context_parallel.config_error
    assert error("pixels", 2, 2) is None
    assert error("pixels", 2, 4) is None  # 2 replicas x 2 context ranks
    assert error("pixels", 4, 4, layout="contiguous") is None
    assert error("transformer", 2, 2, method="ulysses") is None
    assert "no attention" in error("cnn", 2, 2)
    assert "no attention" in error("rnn", 2, 2)
    assert "not a multiple of the context-parallel size 2" in error("pixels", 2, 3)
    assert "196 tokens do not divide into 8 equal chunks" in error("pixels", 4, 4)
    assert "do not divide into 3 equal chunks" in error("pixels", 3, 3, layout="contiguous")
    assert "4 heads do not divide among 8" in error("transformer", 8, 8, method="ulysses")
    assert error("transformer", 2, 4, method="ulysses", tp=2) is None  # 4 heads: 2 x 2
    assert "among 4 tensor- x 2 context-parallel ranks" in error(
        "transformer", 2, 8, method="ulysses", tp=4
    )
    assert error("pixels", 2, 8, tp=4) is None  # the ring needs no whole heads
    assert "must be one of" in error("pixels", 2, 2, layout="stripes")
    assert "must be one of" in error("pixels", 2, 2, method="flash")
    for message in (error("cnn", 2, 2), error("pixels", 4, 4)):
        assert "\n" not in message
