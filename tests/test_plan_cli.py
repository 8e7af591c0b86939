"""`pretrain plan`, called in-process through the CLI entry point."""
import json

import pytest

from orchestration.cli import main


def plan_json(capsys, *args):
    assert main(["plan", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_plan_json_for_tubevit_b(capsys):
    out = plan_json(capsys, "--model", "tubevit-b", "--frames", "32", "--size", "224")
    for key in ("video_tokens", "image_tokens", "params", "gflops_per_clip", "gflops_per_image", "tube_tokens", "config"):
        assert key in out
    assert out["video_tokens"] == 539 and out["image_tokens"] == 196
    assert out["tube_tokens"] == [98, 147, 98, 196]
    assert 85e6 < out["params"] < 95e6
    assert out["gflops_per_clip"] > out["gflops_per_image"] > 0


def test_plan_tubevit_h_64_frames_without_allocating(capsys):
    out = plan_json(capsys, "--model", "tubevit-h", "--frames", "64", "--size", "224")
    assert out["video_tokens"] == 1176 and out["params"] > 600e6 and out["config"]["depth"] == 32


def test_plan_text_output(capsys):
    assert main(["plan", "--model", "tubevit-ti", "--frames", "32", "--size", "112"]) == 0
    text = capsys.readouterr().out
    assert "video_tokens:" in text and "gflops_per_clip:" in text


@pytest.mark.parametrize("args,expected", [
    (["--model", "tubevit-xl"], "valid names: tubevit-ti, tubevit-s, tubevit-b, tubevit-l, tubevit-h"),
    (["--size", "16", "--unfit-tubes", "error"], "does not fit a 32x16x16 clip"),
    (["--frames", "0"], "must both be positive"),
    (["--tubes", "sparse"], "valid names: paper"),
])
def test_plan_bad_input_is_one_paragraph_and_exit_2(capsys, args, expected):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n  ", " ") and "Traceback" not in err


def test_plan_videomae_b_full_and_masked(capsys):
    """VideoMAE-B at 16x224x224: 1568 tokens, 360 GFLOPs; with --mask-ratio 0.9 the masked
    forward (tube masks: 20 of 196 positions visible per time step), against the formula."""
    full = plan_json(capsys, "--model", "videomae-b", "--frames", "16")
    assert full["video_tokens"] == 1568 and full["image_tokens"] == 196
    assert round(full["params"] / 1e6) == 87 and full["gflops_per_clip"] == pytest.approx(360, rel=0.01)
    out = plan_json(capsys, "--model", "videomae-b", "--frames", "16", "--mask-ratio", "0.9",
                    "--accelerator", "h100")
    n, v, d, m, dd, L, DL, P = 1568, 8 * (196 - 176), 768, 3072, 384, 12, 4, 2 * 16 * 16 * 3
    blocks = lambda tokens, w, hidden, depth: depth * (2 * tokens * w * (4 * w + 2 * hidden) + 4 * tokens * tokens * w)  # noqa: E731
    flops = (2 * n * d * P + blocks(v, d, m, L)                              # cube embedding, encoder
             + 2 * v * d * dd + blocks(n, dd, 4 * dd, DL) + 2 * (n - v) * dd * P)   # decoder
    assert out["visible_tokens"] == v == 160
    assert out["gflops_per_clip"] == pytest.approx(flops / 1e9, abs=1e-3)
    assert out["gflops_per_clip_full"] == full["gflops_per_clip"]
    block_params = 12 * dd * dd + 13 * dd
    assert out["decoder_params"] == (d * dd + dd) + dd + DL * block_params + 2 * dd + (dd * P + P)
    assert out["visible_image_tokens"] == 49                                 # images: 0.75
    # A masked run trains at the masked forward's FLOPs: 3 x forward per clip.
    assert out["train_clips_per_s"] == pytest.approx(0.5 * 989e12 / (3 * flops), rel=1e-3)


@pytest.mark.parametrize("args,expected", [
    (["--model", "tubevit-b", "--mask-ratio", "0.9", "--mask-scheme", "tube"], "mask scheme 'tube'"),
    (["--model", "videomae-b", "--frames", "16", "--mask-ratio", "1.2"], "mask ratio 1.2 must be in (0, 1)"),
    (["--model", "videomae-b", "--mask-scheme", "random"], "add --mask-ratio"),
])
def test_plan_mask_flags_errors(capsys, args, expected):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n  ", " ") and "Traceback" not in err


# ------------------------------------------------------------------ data pipeline sizing

def test_plan_feed_arithmetic(capsys):
    """train_clips_per_s = mfu x peak / (3 x forward FLOPs), from the JSON's own FLOPs figure;
    cores per accelerator = clips/s over the given decode rate."""
    from pretrain.train.metrics import PEAK_FLOPS_16BIT

    out = plan_json(capsys, "--model", "tubevit-l", "--frames", "32", "--size", "224",
                    "--accelerator", "h200", "--mfu", "0.4", "--decode-rate", "7.5")
    peak = PEAK_FLOPS_16BIT["H200"]
    assert out["accelerator_peak_tflops"] == pytest.approx(peak / 1e12) and out["mfu"] == 0.4
    clips = 0.4 * peak / (3 * out["gflops_per_clip"] * 1e9)
    images = 0.4 * peak / (3 * out["gflops_per_image"] * 1e9)
    assert out["train_clips_per_s"] == pytest.approx(clips, rel=1e-3)
    assert out["train_images_per_s"] == pytest.approx(images, rel=1e-3)
    assert out["decode_clips_per_s_per_core"] == 7.5
    assert out["decode_cores_per_accelerator"] == pytest.approx(clips / 7.5, abs=0.06)


def test_plan_feed_keys_only_with_an_accelerator(capsys):
    out = plan_json(capsys, "--model", "tubevit-ti", "--frames", "32", "--size", "112")
    assert "train_clips_per_s" not in out and "decode_cores_per_accelerator" not in out
    out = plan_json(capsys, "--model", "tubevit-ti", "--frames", "32", "--size", "112",
                    "--accelerator", "h100-pcie")
    assert out["accelerator_peak_tflops"] == 756.0 and out["mfu"] == 0.5
    assert out["train_clips_per_s"] > 0 and "decode_cores_per_accelerator" not in out


@pytest.mark.parametrize("args,expected", [
    (["--accelerator", "h100", "--mfu", "0"], "--mfu 0.0 must be in (0, 1]"),
    (["--accelerator", "h100", "--mfu", "1.5"], "--mfu 1.5 must be in (0, 1]"),
    (["--accelerator", "h300"], "valid names: a100,"),
    (["--decode-rate", "7.5"], "add --accelerator NAME"),
    (["--measure-decode", "/nowhere"], "add --accelerator NAME"),
    (["--accelerator", "h100", "--decode-rate", "0"], "--decode-rate 0.0 must be a positive"),
])
def test_plan_feed_bad_input_is_a_user_error(capsys, args, expected):
    assert main(["plan", "--model", "tubevit-ti", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n  ", " ") and "Traceback" not in err


def test_plan_decode_flags_are_exclusive(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["plan", "--accelerator", "h100", "--decode-rate", "7", "--measure-decode", "x"])
    assert exc.value.code == 2 and "not allowed with" in capsys.readouterr().err


def test_plan_measures_decode_on_prepared_shards(tmp_path, capsys):
    from pretrain.data.synthetic import prepare_synthetic

    prepare_synthetic(str(tmp_path / "syn"), 8, 0, frames=24, size=32, workers=1)
    uri = str(tmp_path / "syn" / "video" / "train")
    out = plan_json(capsys, "--model", "tubevit-ti", "--frames", "32", "--size", "112",
                    "--skip-unfit-tubes", "--accelerator", "a100", "--measure-decode", uri,
                    "--frame-stride", "1")
    assert out["decode_clips_per_s_per_core"] > 0
    assert out["decode_measured"]["clips"] == 20 and out["decode_measured"]["dataset"] == uri
    assert out["decode_cores_per_accelerator"] == pytest.approx(
        out["train_clips_per_s"] / out["decode_clips_per_s_per_core"], rel=0.02)
    # two clips from each decode: the rate counts training clips
    two = plan_json(capsys, "--model", "tubevit-ti", "--frames", "32", "--size", "112",
                    "--skip-unfit-tubes", "--accelerator", "a100", "--measure-decode", uri,
                    "--frame-stride", "1", "--clips-per-video", "2")
    assert two["decode_measured"]["clips_per_video"] == 2
    assert two["decode_measured"]["clips"] % 2 == 0 and two["decode_clips_per_s_per_core"] > 0
    # an image dataset cannot be decoded as clips
    prepare_synthetic(str(tmp_path / "img"), 0, 4, size=32, workers=1)
    assert main(["plan", "--model", "tubevit-ti", "--accelerator", "a100",
                 "--measure-decode", str(tmp_path / "img" / "image" / "train")]) == 2
    assert "needs video shards" in capsys.readouterr().err
