"""Fine-tuning recipes (conf/recipe/*) and what combines with them: EMA of the weights,
mixup/cutmix with a soft-target loss, drop path."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback

from melanoma.models.classifier import Classifier
from melanoma.workflows.training_run import run
from melanoma.training.module import LesionClassifier
from helpers import CONF_DIR, compose_cfg, tiny_overrides

BACKBONE = {"name": "vit_tiny", "kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32,
                                           "depth": 2, "num_heads": 2, "drop_path_rate": 0.0}}
CLASSES = ["not_melanoma", "melanoma"]
MIXUP = {"mixup_alpha": 1.0, "cutmix_alpha": 0.0, "prob": 1.0, "switch_prob": 0.5, "mode": "batch"}


# --- mixup / cutmix ---------------------------------------------------------------------------

def test_mixup_loss_takes_soft_targets_and_metrics_take_hard_labels(monkeypatch):
    from timm.data import Mixup

    torch.manual_seed(0)
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.1, "class_weights": False})
    module.train()
    seen = []
    monkeypatch.setattr(module.metrics["train_metrics__dermmel"], "update", lambda probs, y: seen.append(y.clone()))
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 0, 1, 1])  # mirrors differ
    np.random.seed(3)
    loss = module.training_step((x.clone(), y), 0)
    module._flush("train", "dermmel")  # the epoch's steps reach the metrics in one update
    # the same draw by hand: timm's Mixup with the run's label smoothing gives soft targets
    np.random.seed(3)
    mixed, target = Mixup(**MIXUP, label_smoothing=0.1, num_classes=2)(x.clone(), y)
    assert ((target > 0.06) & (target < 0.94)).any()  # really soft, not one-hot
    expected = -(target * F.log_softmax(module(mixed).float(), -1)).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    assert len(seen) == 1 and torch.equal(seen[0], y)  # hard labels to the metrics


def test_soft_loss_with_class_weights_reduces_to_weighted_cross_entropy():
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.0, "class_weights": True})
    module.class_weights = {"dermmel": torch.tensor([1.0, 4.0])}
    logits, y = torch.randn(6, 2), torch.tensor([0, 1, 1, 0, 0, 1])
    one_hot = F.one_hot(y, 2).float()
    torch.testing.assert_close(module._soft_loss(logits, one_hot),
                               F.cross_entropy(logits, y, weight=module.class_weights["dermmel"]))


def test_mixup_off_by_default_and_odd_batches_fall_back_to_hard_labels(monkeypatch):
    assert LesionClassifier(BACKBONE, "dermmel", CLASSES).mixup is None
    module = LesionClassifier(BACKBONE, "dermmel", CLASSES, mixup=MIXUP,
                              loss={"label_smoothing": 0.0, "class_weights": False})
    monkeypatch.setattr(module, "log", lambda *a, **k: None)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 1])
    loss = module.training_step((x, y), 0)
    torch.testing.assert_close(loss, F.cross_entropy(module(x).float(), y))


# --- recipes as configs -----------------------------------------------------------------------

RECIPES = sorted(p.stem for p in (CONF_DIR / "recipe").glob("*.yaml"))
TINY = ["model=vit_tiny", "model.backbone.kwargs.embed_dim=32", "model.backbone.kwargs.depth=2",
        "model.backbone.kwargs.num_heads=2", "model.backbone.kwargs.patch_size=8", "dataset.image_size=32"]
LAYERS = ["patch_embed", "pos_cls", "block0", "block1", "norm"]


def build(overrides):
    from hydra.utils import instantiate

    from melanoma.training.callbacks import build_callbacks

    cfg = compose_cfg([*TINY, *overrides], Path("/tmp/unused"))
    module = instantiate(cfg.model, _recursive_=False, _convert_="all")(
        dataset_name="dermmel", class_names=CLASSES, image_size=32, interpolation="bicubic")
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    lrs = {g["layer"]: g.get("initial_lr", g["lr"]) for g in opt.param_groups}  # before warmup
    callbacks = {type(c).__name__: c for c in build_callbacks(cfg.callbacks, progress_bar=False)}
    return cfg, module, lrs, callbacks


def test_the_five_recipes_exist():
    assert set(RECIPES) == {"linear_probe", "full_finetune", "gradual", "llrd", "lp_ft"}


def test_linear_probe_trains_the_head_only():
    _, _, _, cbs = build(["recipe=linear_probe"])
    unfreezing = cbs["GradualUnfreezing"]
    assert unfreezing.resolve_stages(LAYERS) == []
    assert all(unfreezing.trainable_layers(e, LAYERS) == {"head"} for e in range(30))


def test_full_finetune_trains_every_layer_at_one_rate():
    cfg, _, lrs, cbs = build(["recipe=full_finetune"])
    assert "GradualUnfreezing" not in cbs
    assert {lrs[layer] for layer in LAYERS} == {cfg.model.optimizer.lr}
    assert lrs["head"] == cfg.model.optimizer.head_lr


def test_gradual_thaws_one_layer_per_epoch_under_the_plateau_that_keeps_ratios():
    from melanoma.training.optim import LayerwisePlateauLR

    cfg, module, _, cbs = build(["recipe=gradual"])
    assert cbs["GradualUnfreezing"].trainable_layers(5, LAYERS) == {"head", "norm"}
    assert cbs["GradualUnfreezing"].warmup_steps == 50
    sched = module.configure_optimizers()["lr_scheduler"]["scheduler"]
    assert isinstance(sched, LayerwisePlateauLR) and sched.hold_while_frozen


def test_llrd_rates_decay_geometrically_from_the_top():
    _, _, lrs, cbs = build(["recipe=llrd"])
    assert "GradualUnfreezing" not in cbs
    d = 0.65
    assert lrs == pytest.approx({"head": 2e-4, "norm": 2e-4, "block1": 2e-4 * d, "block0": 2e-4 * d**2,
                                 "pos_cls": 2e-4 * d**3, "patch_embed": 2e-4 * d**3})


def test_lp_ft_probes_then_thaws_everything_at_once_with_llrd():
    _, _, lrs, cbs = build(["recipe=lp_ft", "callbacks.unfreezing.start_epoch=3"])
    unfreezing = cbs["GradualUnfreezing"]
    assert unfreezing.trainable_layers(2, LAYERS) == {"head"}
    assert unfreezing.trainable_layers(3, LAYERS) == {"head", *LAYERS}
    assert lrs["block0"] / lrs["block1"] == pytest.approx(0.65) and lrs["head"] == 1e-3


@pytest.mark.parametrize("recipe", ["linear_probe", "full_finetune", "gradual", "llrd", "lp_ft"])
def test_every_recipe_combines_with_ema_mixup_and_drop_path(recipe):
    from melanoma.training.ema import EMAWeights

    _, module, _, cbs = build([f"recipe={recipe}", "ema=on", "model.mixup.mixup_alpha=0.8",
                               "model.mixup.cutmix_alpha=1.0", "model.backbone.kwargs.drop_path_rate=0.2"])
    assert isinstance(cbs["EMAWeights"], EMAWeights)
    assert module.mixup is not None and module.mixup.mixup_alpha == 0.8 and module.mixup.cutmix_alpha == 1.0
    rates = [b.drop_path.drop_prob for b in module.model.backbone.blocks if hasattr(b.drop_path, "drop_prob")]
    assert rates and max(rates) == pytest.approx(0.2)


# --- EMA of the weights -----------------------------------------------------------------------

HEAD_W = "model.heads.dermmel.fc.weight"


class EmaSpy(Callback):
    """Listed after the EMA callback: sees the weights after each optimizer step, the weights that
    are validated, and what a resumed run starts from."""

    seen: dict = {}

    def __init__(self):
        EmaSpy.seen = {"steps": [], "validated": [], "start": None, "tested": None}

    def on_train_start(self, trainer, pl_module):
        ema = next(c for c in trainer.callbacks if type(c).__name__ == "EMAWeights")
        EmaSpy.seen["start"] = (pl_module.state_dict()[HEAD_W].clone(),
                                ema._average_model.module.state_dict()[HEAD_W].clone(),
                                int(ema._average_model.n_averaged))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        EmaSpy.seen["steps"].append(pl_module.state_dict()[HEAD_W].clone())

    def on_validation_epoch_start(self, trainer, pl_module):
        EmaSpy.seen["validated"].append(pl_module.state_dict()[HEAD_W].clone())

    def on_test_epoch_start(self, trainer, pl_module):
        EmaSpy.seen["tested"] = pl_module.state_dict()[HEAD_W].clone()


def hand_ema(weights, decay):
    ema = weights[0].clone()  # the first update copies
    for w in weights[1:]:
        ema = decay * ema + (1 - decay) * w
    return ema


def ema_run(root, out, max_epochs, ckpt_path=None):
    cfg = compose_cfg([*tiny_overrides(root, max_epochs=max_epochs), "ema=on", "callbacks.ema.decay=0.5",
                       "+callbacks.spy._target_=test_training_recipes.EmaSpy", "model/scheduler=none",
                       "model.optimizer.head_lr=0.05",
                       *([f"ckpt_path={ckpt_path}"] if ckpt_path else [])], out)
    run(cfg)
    return EmaSpy.seen


def test_ema_weights_are_validated_checkpointed_predicted_with_and_resumed(tiny_dermmel, tmp_path):
    seen = ema_run(tiny_dermmel, tmp_path / "run", max_epochs=2)
    steps = seen["steps"]
    assert len(steps) == 4 and not torch.equal(steps[0], steps[-1])
    # each validation epoch (after steps 2 and 4) ran on the EMA, not on the raw weights
    assert len(seen["validated"]) == 2
    torch.testing.assert_close(seen["validated"][0], hand_ema(steps[:2], 0.5))
    torch.testing.assert_close(seen["validated"][1], hand_ema(steps, 0.5))
    assert not torch.allclose(seen["validated"][1], steps[-1])
    # the checkpoint's state_dict (what the checkpoint contract reads) holds the EMA
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    torch.testing.assert_close(ckpt["state_dict"][HEAD_W], hand_ema(steps, 0.5))
    torch.testing.assert_close(ckpt["current_model_state"][HEAD_W], steps[-1])
    # the test after fit ran on the best checkpoint's EMA, not on its raw weights
    best = torch.load(tmp_path / "run" / "checkpoints" / "best.ckpt", weights_only=True)
    torch.testing.assert_close(seen["tested"], best["state_dict"][HEAD_W])
    assert not torch.allclose(seen["tested"], best["current_model_state"][HEAD_W])
    model, _ = Classifier.from_checkpoint(last, map_location="cpu")
    model.eval()
    torch.testing.assert_close(model.heads["dermmel"].fc.weight, hand_ema(steps, 0.5))
    # and predicts with the EMA: the same logits as a network holding the EMA state by hand
    x = torch.randn(2, 3, 32, 32)
    twin, _ = Classifier.from_checkpoint(last, map_location="cpu")
    twin.load_state_dict({k[len("model."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("model.")})
    twin.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x, "dermmel"), twin(x, "dermmel"))
    raw, _ = Classifier.from_checkpoint(last, map_location="cpu")
    raw.load_state_dict({k[len("model."):]: v for k, v in ckpt["current_model_state"].items() if k.startswith("model.")})
    raw.eval()
    with torch.no_grad():
        assert not torch.allclose(model(x, "dermmel"), raw(x, "dermmel"))

    # resume: the raw weights continue training, the EMA continues from its saved state
    seen = ema_run(tiny_dermmel, tmp_path / "resumed", max_epochs=3, ckpt_path=last)
    current, average, n = seen["start"]
    torch.testing.assert_close(current, steps[-1])
    torch.testing.assert_close(average, hand_ema(steps, 0.5))
    assert n == 4
    torch.testing.assert_close(seen["validated"][-1], hand_ema([*steps, *seen["steps"]], 0.5))
