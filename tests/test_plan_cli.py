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
    (["--size", "16"], "does not fit a 32x16x16 clip"),
    (["--frames", "0"], "must both be positive"),
    (["--tubes", "sparse"], "valid names: paper"),
])
def test_plan_bad_input_is_one_paragraph_and_exit_2(capsys, args, expected):
    assert main(["plan", *args]) == 2
    err = capsys.readouterr().err
    assert expected in err.replace("\n  ", " ") and "Traceback" not in err
