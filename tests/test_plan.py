import pytest

from pomq_deploy.errors import PlanError
from pomq_deploy.plan import BlockBits, Plan, dump_plan, load_plan, parse_uniform, save_plan, uniform_plan

PAPER = [4, 4, 8, 8, 8, 8, 8, 8, 8, 8, 4, 4]  # PoMQ-ViT's first/last-two-blocks-4-bit plan


def paper_plan():
    return Plan(recipe="deit_fmnist", scheme="fqvit", blocks=tuple(BlockBits(w=b, a=8, attn=b) for b in PAPER))


def test_yaml_roundtrip_and_format(tmp_path):
    plan = paper_plan()
    path = tmp_path / "p.yaml"
    save_plan(plan, path)
    text = path.read_text()
    assert "  - {w: 4, a: 8, attn: 4}\n" in text and text.startswith("recipe: deit_fmnist\nscheme: fqvit\nrounding: nearest\nblocks:\n")
    assert load_plan(path) == plan
    assert [p.name for p in tmp_path.iterdir()] == ["p.yaml"]  # no temporary file left behind


def test_measured_roundtrips(tmp_path):
    plan = Plan(recipe="m", scheme="tsptq", blocks=(BlockBits(w=8, a=8, attn=4),),
                measured={"top1": 0.87, "latency_ms": {"median": 3.4, "backend": "ort-cpu"}})
    path = tmp_path / "p.yaml"
    path.write_text(dump_plan(plan))
    assert load_plan(path) == plan


@pytest.mark.parametrize(
    "row, message",
    [
        ("{w: 5, a: 8, attn: 4}", r"'blocks\[1\].w': Input should be 4, 8, 'fp8' or 'float' \(got 5\)"),
        ("{w: fp8, a: 8, attn: 8}", r"'blocks\[1\]': w=fp8 with a=8: no engine runs that GEMM; with w=fp8, a is fp8$"),
        ("{w: float, a: 4, attn: 8}", r"'blocks\[1\]': w=float with a=4: .*; with w=float, a is float$"),
        ("{w: 8, a: fp8, attn: 8}", r"'blocks\[1\]': w=8 with a=fp8: .*; with w=8, a is 4 or 8 or float$"),
        ("{w: 4, a: 8}", r"missing required key 'blocks\[1\].attn'"),
        ("{w: 4, a: 8, attn: 4, x: 1}", r"unknown key 'blocks\[1\].x'; allowed keys here: w, a, attn"),
    ],
)
def test_bad_rows_name_the_file_and_block(tmp_path, row, message):
    path = tmp_path / "bad.yaml"
    path.write_text(f"model: m\nscheme: fqvit\nblocks:\n  - {{w: 4, a: 8, attn: 4}}\n  - {row}\n")
    with pytest.raises(PlanError, match=message) as e:
        load_plan(path)
    assert str(e.value).startswith(str(path))


def test_bad_scheme_and_unknown_top_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: m\nscheme: awq\nblocks: [{w: 4, a: 8, attn: 4}]\n")
    with pytest.raises(PlanError, match=r"'scheme': unknown scheme 'awq'; allowed: fqvit, tsptq, repq, repq_smooth, minmax \(got 'awq'\)$"):
        load_plan(path)
    path.write_text("model: m\nscheme: fqvit\nblocks: [{w: 4, a: 8, attn: 4}]\nbits: 3\n")
    with pytest.raises(PlanError, match="unknown key 'bits'; allowed keys here: recipe, scheme, blocks, measured"):
        load_plan(path)


def test_block_count_must_fit_the_model():
    with pytest.raises(PlanError, match="has 12 rows but recipe deit_fmnist's model has 4 encoder blocks"):
        paper_plan().check_blocks(4, "p.yaml")


def test_uniform_and_mixed():
    plan = uniform_plan("8/8/4", 3, "m", "fqvit")
    assert plan.blocks == (BlockBits(w=8, a=8, attn=4),) * 3
    assert plan.is_mixed and not uniform_plan("8/8/8", 3, "m", "fqvit").is_mixed
    assert not uniform_plan("4/4/4", 3, "m", "fqvit").is_mixed and paper_plan().is_mixed
    with pytest.raises(ValueError, match="expected W/A/ATTN"):
        parse_uniform("8/8/2")


def test_engine_genes_parse_and_plans_of_today_keep_their_ids(tmp_path):
    """fp8 and float genes beside 4 and 8; the ids below were computed by the code before those genes existed."""
    assert parse_uniform("4/float/float") == BlockBits(w=4, a="float", attn="float")
    assert not parse_uniform("fp8/fp8/8").integer and parse_uniform("8/4/8").integer
    with pytest.raises(ValueError, match="'fp8/8/8': w=fp8 with a=8"):
        parse_uniform("fp8/8/8")
    path = tmp_path / "p.yaml"
    path.write_text("recipe: m\nscheme: fqvit\nblocks:\n  - {w: float, a: float, attn: float}\n  - {w: 4, a: float, attn: fp8}\n")
    plan = load_plan(path)
    assert plan.blocks[1] == BlockBits(w=4, a="float", attn="fp8") and not plan.is_mixed
    save_plan(plan, path)
    assert "  - {w: 4, a: float, attn: fp8}\n" in path.read_text() and load_plan(path) == plan
    from pomq_deploy.plan import paper_plan as papers_plan
    assert papers_plan(12, "deit_fmnist", "repq").plan_id == "4a2ee837c3b0"
    assert uniform_plan("4/8/8", 12, "deit_fmnist", "fqvit", "gptq").plan_id == "a779cf7c6649"


def test_plan_id_is_content_hash():
    a, b = paper_plan(), paper_plan()
    assert a.plan_id == b.plan_id and len(a.plan_id) == 12
    assert uniform_plan("8/8/8", 12, "deit_fmnist", "fqvit").plan_id != a.plan_id
    assert Plan(recipe="deit_fmnist", scheme="tsptq", blocks=a.blocks).plan_id != a.plan_id


def test_the_papers_plan_puts_the_first_and_last_two_blocks_at_4_bits():
    from pomq_deploy.plan import paper_plan as papers_plan

    plan = papers_plan(12, "deit_fmnist", "fqvit")
    assert [b.w for b in plan.blocks] == PAPER and all(b.w == b.a == b.attn for b in plan.blocks)
    assert [b.a for b in papers_plan(6, "m", "fqvit").blocks] == [4, 4, 8, 8, 4, 4]
