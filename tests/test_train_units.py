"""Fast checks of the training pieces that need no process group: schedule, weight-decay
groups, DeepSpeed config, the MFU table, the loss window carried over a resume, the
classification objective, the all-parameters forward, MLflow's skip of logged steps, and
the trainer's teardown when a step fails, and its claim on the checkpoint URI before it
builds anything."""
from __future__ import annotations

import math

import pytest
import torch

from pretrain.errors import UserError
from pretrain.train.config import ExperimentConfig, from_dict
from pretrain.train.engine import deepspeed_config
from pretrain.train.metrics import IntervalTotals, accelerator_peak
from pretrain.train.optim import param_groups, warmup_cosine


def cfg(**train):
    return from_dict(ExperimentConfig, {"model": {"name": "tubevit-ti"},
                                        "data": {"video_uri": "v", "batch_size": 4},
                                        "train": {"steps": 100, **train}})


def test_warmup_then_cosine():
    lr = lambda s: warmup_cosine(s, warmup=10, total=110, peak=1.0, final=0.1)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert lr(110) == pytest.approx(0.1) and lr(500) == pytest.approx(0.1)
    assert all(lr(s) >= lr(s + 1) for s in range(10, 110))


def test_no_weight_decay_params_are_excluded():
    from pretrain.model import create_model

    model = create_model("tubevit-ti", depth=1, dim=48, heads=2, mlp_dim=96)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert model.no_weight_decay() <= skipped
    assert "pool.query" in skipped
    assert all(p.ndim > 1 for p in decay["params"])


def test_deepspeed_config_follows_train_section():
    ds = deepspeed_config(cfg(zero_stage=3, precision="bf16", grad_accum_steps=4, grad_clip=0.5), 8)
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["train_batch_size"] == 4 * 4 * 8 and ds["gradient_accumulation_steps"] == 4
    assert ds["gradient_clipping"] == 0.5
    off = deepspeed_config(cfg(zero_stage=3, cpu_offload=True), 2)["zero_optimization"]
    assert off["offload_param"]["device"] == "cpu" and off["offload_optimizer"]["device"] == "cpu"
    assert "bf16" not in deepspeed_config(cfg(precision="fp32"), 1)
    # ZeRO-3's working set is bounded by our settings, not DeepSpeed's 1e9-element defaults
    # (which kept every gathered block whole until its backward and stepped Adam on the
    # whole partition at once).
    z3 = deepspeed_config(cfg(zero_stage=3, zero_bucket_elements=20_000_000,
                              zero3_sub_group_elements=5_000_000), 2)["zero_optimization"]
    assert z3["stage3_max_live_parameters"] == z3["stage3_max_reuse_distance"] == 20_000_000
    assert z3["stage3_prefetch_bucket_size"] == z3["reduce_bucket_size"] == 20_000_000
    assert z3["sub_group_size"] == 5_000_000


def test_mfu_peak_only_for_known_accelerators():
    assert accelerator_peak("NVIDIA H100 80GB HBM3", "bf16") == ("H100", 989e12)
    assert accelerator_peak("NVIDIA H100 PCIe", "bf16")[1] == 756e12
    assert accelerator_peak("NVIDIA A100-SXM4-80GB", "bf16")[1] == 312e12
    assert accelerator_peak("some cpu", "bf16")[1] is None


def test_loss_window_mean_and_carry_over_resume():
    w = IntervalTotals()
    for v in (1.0, 2.0, 3.0):
        w.add_step(torch.tensor(v), 4, 40, 1e6, "video")
    carried = w.carry(1)
    assert carried == {"loss_mean": 2.0, "steps": 3.0}
    resumed = IntervalTotals.from_carry(carried)
    resumed.add_step(torch.tensor(6.0), 4, 40, 1e6, "image")
    m = resumed.reduce(1, None, 1e-3)
    assert m["train/loss"] == pytest.approx(3.0)   # (1 + 2 + 3 + 6) / 4, as without a resume
    assert "perf/mfu" not in m and m["train/lr"] == 1e-3


def _tiny_model():
    from pretrain.model import create_model

    torch.manual_seed(0)
    return create_model("tubevit-ti", num_classes={"vid": 4, "img": 3}, depth=1, dim=48,
                        heads=2, mlp_dim=96,
                        tubes=[{"kernel": [1, 8, 8], "stride": [8, 8, 8]},
                               {"kernel": [4, 8, 8], "stride": [4, 8, 8]}])


class _Batch:
    def __init__(self, dataset, x, y, views=1, valid=None):
        self.modality = "video" if x.ndim == 5 else "image"
        self.dataset, self.x, self.y, self.views, self.valid = dataset, x, y, views, valid

    def __len__(self):
        return len(self.y)

    def normalized(self, device, dtype):   # already model input
        return self


def test_classification_loss_is_cross_entropy_of_the_dataset_heads_logits():
    import torch.nn.functional as F

    from pretrain.train.objectives import make_objective

    model = _tiny_model()
    objective = make_objective("classification")
    for dataset, x, y in (("vid", torch.randn(2, 3, 8, 16, 16), torch.tensor([3, 1])),
                          ("img", torch.randn(2, 3, 16, 16), torch.tensor([2, 0]))):
        loss = objective.loss(model, _Batch(dataset, x, y))
        torch.testing.assert_close(loss, F.cross_entropy(model(x, dataset=dataset), y))
    with pytest.raises(UserError, match="objective 'nope'.*classification"):
        make_objective("nope")


def test_classification_top1_averages_views_and_skips_padding():
    from pretrain.train.objectives import make_objective

    class Fixed(torch.nn.Module):   # logits chosen per row
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x, dataset=None):
            return self.logits

    # 3 clips x 2 views; clip 0: views disagree, their mean picks class 1 (right);
    # clip 1: wrong; clip 2: right but padding (valid=False), not counted.
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [3.0, 0.0], [3.0, 0.0], [0.0, 5.0], [0.0, 5.0]])
    batch = _Batch("vid", torch.zeros(6, 3, 1, 1, 1), torch.tensor([1, 1, 1]), views=2,
                   valid=torch.tensor([True, True, False]))
    got = make_objective("supervised").evaluate(Fixed(logits), "video", {"held_out": [batch]}, world=1)
    assert got == {"eval/video_top1": 0.5}


def test_frame_average_eval_runs_each_frame_as_an_image_and_averages():
    """data.eval_frame_average: a clip's prediction is the mean over its frames (and views)
    of the softmax of the model on each frame alone; the model sees only images."""
    from types import SimpleNamespace

    from pretrain.train.objectives import make_objective

    class PerFrame(torch.nn.Module):   # class 1 when the frame's mean is positive
        seen: list = []

        def forward(self, x, dataset=None):
            self.seen.append(x.ndim)
            m = x.mean((1, 2, 3))
            return torch.stack([-m, m], -1) * 10

    # clip 0: 3 of 4 frames positive -> class 1 (right); clip 1: 1 of 4 -> class 0 (wrong)
    x = torch.ones(2, 3, 4, 2, 2)
    x[0, :, 0] = -1
    x[1, :, :3] = -1
    batch = _Batch("vid", x, torch.tensor([1, 1]), views=1, valid=None)
    cfg = SimpleNamespace(data=SimpleNamespace(eval_frame_average=True))   # what it reads
    got = make_objective("supervised", cfg).evaluate(PerFrame(), "video", {"held_out": [batch]},
                                                     world=1)
    assert got == {"eval/video_top1": 0.5} and set(PerFrame.seen) == {4}
    # the clip model itself (no flag) would be called on the 5-D clips
    PerFrame.seen.clear()
    make_objective("supervised").evaluate(PerFrame(), "video", {"held_out": [batch]}, world=1)
    assert set(PerFrame.seen) == {5}


def test_all_parameters_forward_gives_every_parameter_a_gradient_and_same_logits():
    model = _tiny_model()
    x = torch.randn(2, 3, 16, 16)   # an image step: the video head and 3-D tube are idle
    plain = model(x, dataset="img")
    plain.sum().backward()
    idle = {n for n, p in model.named_parameters() if p.grad is None}
    assert any(n.startswith("heads.vid") for n in idle) and any("tube" in n for n in idle)
    model.zero_grad(set_to_none=True)
    model.set_all_parameters_in_forward(True)
    both = model(x, dataset="img")
    torch.testing.assert_close(both, plain)
    both.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(torch.count_nonzero(p.grad) == 0 for n, p in model.named_parameters() if n in idle)
    model.eval()   # evaluation runs only the batch's own head
    model.zero_grad(set_to_none=True)
    model(x, dataset="img").sum().backward()
    assert {n for n, p in model.named_parameters() if p.grad is None} == idle


def test_skip_logged_drops_steps_at_or_below_the_last_logged_one():
    from pretrain.train.tracking import SkipLogged

    class Recorder:
        send_time_s = 1.5

        def __init__(self):
            self.steps, self.closed = [], False

        def log(self, metrics, step):
            self.steps.append(step)

        def close(self, timeout=60.0):
            self.closed = True

    inner = Recorder()
    logger = SkipLogged(inner, done=4)
    for step in range(1, 8):
        logger.log({"train/loss": 1.0}, step)
    logger.close()
    assert inner.steps == [5, 6, 7] and inner.closed and logger.send_time_s == 1.5


def test_a_failing_step_still_closes_loaders_and_logger_and_ends_its_run(tmp_path, monkeypatch):
    """Teardown runs on an exception: the trainer's own setup with real tracking (a run it
    opens in a sqlite MLflow), real model, checkpoint hook and stop agreement; only the
    process group, DeepSpeed and the shard-reading loader are replaced. The loader yields a
    batch for a dataset the model has no head for, so the first step raises."""
    from mlflow.tracking import MlflowClient

    from pretrain.data.metadata import DataInfo
    from pretrain.train import worker
    from pretrain.train.device_batches import DeviceBatches

    class Loader:   # a training loader with no shards behind it
        closed = False

        def __next__(self):
            return _Batch("unknown", torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]))

        def close(self):
            self.closed = True

    loader = Loader()
    info = DataInfo({"video": {"name": "vid", "num_classes": 4},
                     "image": {"name": "img", "num_classes": 3}}, (8, 16, 16), (16, 16))
    monkeypatch.setattr(worker, "init_distributed", lambda cfg: (0, 1))
    monkeypatch.setattr(DataInfo, "from_config", classmethod(lambda cls, data: info))
    monkeypatch.setattr(worker, "build_engine", lambda model, cfg, world: (model, None, None))
    monkeypatch.setattr(worker, "train_batches",
                        lambda *a, device, dtype: DeviceBatches(loader, device, dtype))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = from_dict(ExperimentConfig, {
        "model": {"name": "tubevit-ti", "depth": 1, "dim": 48, "heads": 2, "mlp_dim": 96,
                  "tubes": [{"kernel": [1, 8, 8], "stride": [8, 8, 8]},
                            {"kernel": [4, 8, 8], "stride": [4, 8, 8]}]},
        "data": {"video_uri": "v", "image_uri": "i", "batch_size": 2, "frames": 8, "size": 16,
                 "image_size": 16},
        "train": {"steps": 3, "precision": "fp32"},
        "resources": {"threads_per_worker": torch.get_num_threads()},
        "tracking": {"tracking_uri": uri, "experiment": "teardown"}})
    trainer = worker.Trainer(cfg, progress=False)
    with pytest.raises(UserError, match="'unknown' has no head"):
        trainer.train()
    assert loader.closed
    assert trainer.tracking.owns_run and trainer.tracking.logger.mark().is_set()  # thread done
    assert MlflowClient(uri).get_run(trainer.tracking.run_id).info.status == "FAILED"


def test_the_checkpoint_uri_is_claimed_before_the_build_and_let_go_on_failure(tmp_path,
                                                                             monkeypatch):
    """The trainer claims the checkpoint URI's lease before it builds anything
    (CheckpointHook.claim): another job's live lease refuses it at once, with no model
    built and no tracking run opened; a run that claimed it and failed releases it."""
    import time

    from checkpoints.lease import LEASE, LeaseHeld, LeaseRecord
    from pretrain.data.metadata import DataInfo
    from pretrain.train import worker

    uri = tmp_path / "ck"
    uri.mkdir()
    now = time.time()
    (uri / LEASE).write_bytes(LeaseRecord("elsewhere:7:other", "ray:other", "elsewhere", 7, now,
                                          now, 300.0).to_json())
    info = DataInfo({"video": {"name": "vid", "num_classes": 4}}, (8, 16, 16), (16, 16))
    built = []
    monkeypatch.setattr(worker, "init_distributed", lambda cfg: (0, 1))
    monkeypatch.setattr(DataInfo, "from_config", classmethod(lambda cls, data: info))
    monkeypatch.setattr(worker, "build_model", lambda *a: built.append("model"))
    monkeypatch.setattr(worker, "open_tracking", lambda *a: built.append("tracking"))
    config = from_dict(ExperimentConfig, {
        "model": {"name": "tubevit-ti"}, "data": {"video_uri": "v", "batch_size": 2},
        "train": {"steps": 3, "precision": "fp32"},
        "checkpoint": {"uri": str(uri), "local_dir": str(tmp_path / "local")},
        "resources": {"threads_per_worker": torch.get_num_threads()}})
    with pytest.raises(LeaseHeld, match="elsewhere:7:other"):
        worker.Trainer(config, progress=False).train()
    assert built == []
    assert b"elsewhere:7:other" in (uri / LEASE).read_bytes()     # the other job's, untouched

    # A run that claimed the URI and then failed lets go of it: its next attempt (on another
    # host too, where it cannot see that this process is gone) is not held up.
    (uri / LEASE).unlink()

    def bad_model(*a):
        assert (uri / LEASE).exists()                           # claimed before the build
        raise UserError("model.depth: no such thing")

    monkeypatch.setattr(worker, "build_model", bad_model)
    with pytest.raises(UserError, match="no such thing"):
        worker.Trainer(config, progress=False).train()
    assert not (uri / LEASE).exists()
