"""bench/vision.py (issue 21's Qwen3-VL benchmarks) runs end to end on the CPU with --smoke (the tiny Qwen3-VL
preset) and writes its JSON, so the GPU stage (bench/gpu_check.sh vision) starts from a script known to run: the
encoder part's tower equals transformers' on the same weights, and the TTFT part's three deployments give the
same first tokens, with the images encoded where each deployment says."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("PIL")
pytest.importorskip("transformers")

from bench import vision  # noqa: E402

pytestmark = pytest.mark.timeout(120)


def read(out) -> dict:
    (path,) = out.glob("vision-smoke-*.json")
    return json.loads(path.read_text())


def test_encoder_smoke_matches_hf(tmp_path):
    vision.main(["--device", "cpu", "--smoke", "--parts", "encoder", "--out", str(tmp_path)])
    r = read(tmp_path)
    assert r["smoke"] and r["device"] == "cpu" and "ttft" not in r
    assert {"machine", "model", "encoder", "wall_s"} <= set(r)
    check = r["model"]["vision_config_check"]["differs_from_defaults"]
    assert check["depth"] == {"preset": 3, "transformers_default": 27}  # the tiny tower, checked against HF
    rows = r["encoder"]["rows"]
    assert [(row["image_side"], row["batch"]) for row in rows] == list(vision.SMOKE_SHAPES)
    for row in rows:
        assert set(row["max_rel_diff"]) == {"merged", "deepstack_0", "deepstack_1"}
        assert 0 <= row["max_rel_diff_worst"] < 1e-4  # f32: ours and HF's tower agree (both on SDPA's flash kernel,
        # bit-equal here; the keys above say each output was compared)
        assert row["tokens_per_image"] == row["patches_per_image"] // 4
        for k in ("ours", "ours_per_image", "hf"):
            assert row[f"{k}_images_per_s"] == pytest.approx(row["batch"] / (row[f"{k}_ms"] / 1e3))
    assert r["encoder"]["providers"]["vision_attention:torch"] == 3  # one per block of the tiny tower


def test_preset_vision_tower_is_qwen3_vl_8b():
    """The full-size preset differs from transformers' Qwen3VLVisionConfig defaults in out_hidden_size only
    (Qwen3-VL-8B's text width 4096; the defaults carry 3584)."""
    check = vision.check_vision_config(vision.PRESETS[vision.PRESET]["vision_config"])
    assert check["differs_from_defaults"] == {"out_hidden_size": {"preset": 4096, "transformers_default": 3584}}


def test_cpu_without_smoke_is_refused(capsys):
    with pytest.raises(SystemExit):
        vision.main(["--device", "cpu", "--parts", "encoder"])
    assert "--device cpu needs --smoke" in capsys.readouterr().err


@pytest.mark.slow
def test_ttft_smoke_three_deployments_agree(tmp_path):
    """Four engine processes (co-located, encode, prefill, decode) on the CPU: about 15 s."""
    vision.main(["--device", "cpu", "--smoke", "--parts", "ttft", "--requests", "2", "--warmup-requests", "1",
                 "--out", str(tmp_path)])
    t = read(tmp_path)["ttft"]
    d = t["deployments"]
    assert d["colocated"]["images_encoded_by"] == {"both": 2}
    assert d["epd"]["images_encoded_by"] == {"encode": 2, "prefill": 0, "decode": 0}
    assert d["pd_prefill_encodes"]["images_encoded_by"] == {"prefill": 2, "decode": 0}
    firsts = [dep["first_tokens"] for dep in d.values()]
    assert all(f == firsts[0] for f in firsts) and t["same_first_token_colocated_vs_epd"] == "2/2"
    for dep in d.values():
        assert dep["requests"] == 2 and 0 < dep["ttft_ms"]["p50"] <= dep["ttft_ms"]["p90"]
    assert t["ratio"]["epd_over_colocated_ttft_p50"] > 0
    assert t["config"]["prompt_tokens_after_expansion"] == 3 - 1 + 16 + 64  # a 64x64 image is resized to 256x256
