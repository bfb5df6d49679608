"""The configs mirror the code: every model/dataset/experiment config builds the objects it names,
with the values its YAML says, and no code default stands in for a YAML value."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from melanoma.data.transforms import DEFAULT_AUGMENT, resolve_augment
from melanoma.models.vit import PRESETS
from melanoma.training import optim
from melanoma.training.module import LesionClassifier
from melanoma.workflows.datasets import instantiate_dataset
from helpers import CONF_DIR, compose_cfg

MODELS = sorted(p.stem for p in (CONF_DIR / "model").glob("vit_*.yaml"))
DATASETS = sorted(p.stem for p in (CONF_DIR / "dataset").glob("*.yaml"))
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
TINY = ["model.backbone.kwargs.embed_dim=32", "model.backbone.kwargs.depth=2",
        "model.backbone.kwargs.num_heads=2", "model.backbone.kwargs.patch_size=8", "dataset.image_size=32"]
CLASSES = ["not_melanoma", "melanoma"]


def build(overrides: list[str]) -> tuple:
    """The composed config and its module, built the way train.py builds it (without data)."""
    cfg = compose_cfg([*overrides, *TINY], Path("/tmp/unused"))
    module = instantiate(cfg.model, _recursive_=False, _convert_="all")(
        dataset_name="dermmel", class_names=CLASSES, image_size=32, interpolation="bicubic")
    return cfg, module


def optimizers(module: LesionClassifier):
    """configure_optimizers outside a trainer (run length 1 step, 1 epoch)."""
    out = module.configure_optimizers()
    return (out, None) if isinstance(out, torch.optim.Optimizer) else (out["optimizer"], out["lr_scheduler"])


def lr_by_layer(optimizer) -> dict[str, float]:
    """Each layer's configured rate (before a scheduler's first multiplier, e.g. warmup)."""
    return {g["layer"]: g.get("initial_lr", g["lr"]) for g in optimizer.param_groups}


def test_configs_are_found():
    assert MODELS == ["vit_base", "vit_small", "vit_tiny"]
    assert {"dermmel", "ham10000", "isic", "ph2", "synthetic"} <= set(DATASETS)
    assert {"quickstart", "dermmel_reference"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("overrides", [[f"model={m}"] for m in MODELS] + [[f"experiment={e}"] for e in EXPERIMENTS])
def test_optimizer_and_scheduler_are_what_the_yaml_says(overrides):
    cfg, module = build(overrides)
    opt, sched = optimizers(module)
    o, s = cfg.model.optimizer, cfg.model.scheduler
    assert f"{type(opt).__module__}.{type(opt).__qualname__}".replace(".adamw", "") == o._target_
    lrs = lr_by_layer(opt)
    group_lr = {k: v for k, v in o.group_lr.items() if v is not None}
    head = group_lr.get("head", o.head_lr if o.head_lr is not None else o.lr)
    assert lrs["head"] == pytest.approx(head)
    assert lrs["block0"] == pytest.approx(group_lr.get("blocks", o.lr))
    assert lrs["norm"] == pytest.approx(group_lr.get("norm", o.lr))
    assert lrs["pos_cls"] == pytest.approx(group_lr.get("pos_cls", o.lr))
    assert {g["weight_decay"] for g in opt.param_groups} == {0.0, o.weight_decay}
    if s._target_ is None:
        assert sched is None
        return
    assert type(sched["scheduler"]).__name__ == s._target_.rsplit(".", 1)[1]
    assert sched["interval"] == s.interval and sched.get("monitor") == s.monitor


def test_quickstart_and_dermmel_reference_reach_the_optimizer():
    _, module = build(["experiment=quickstart"])
    opt, sched = optimizers(module)
    assert isinstance(opt, torch.optim.AdamW) and set(lr_by_layer(opt).values()) == {1e-3}
    assert isinstance(sched["scheduler"], optim.WarmupCosineLR) and sched["interval"] == "step"
    _, module = build(["experiment=dermmel_reference"])
    opt, sched = optimizers(module)
    assert lr_by_layer(opt) == pytest.approx({"head": 1e-4, "norm": 1e-6, "block1": 1e-5, "block0": 1e-5,
                                              "pos_cls": 1e-7, "patch_embed": 1e-6})
    plateau = sched["scheduler"]
    assert isinstance(plateau, torch.optim.lr_scheduler.ReduceLROnPlateau)
    assert (plateau.patience, plateau.factor, plateau.mode) == (3, 0.1, "min")
    assert sched["monitor"] == "val/loss" and sched["interval"] == "epoch"


def test_any_torch_optimizer_by_config():
    _, module = build(["model=vit_tiny", "model.optimizer._target_=torch.optim.SGD", "+model.optimizer.momentum=0.8",
                       "model.optimizer.lr=0.02", "model.optimizer.head_lr=0.2"])
    opt, _ = optimizers(module)
    assert type(opt) is torch.optim.SGD
    assert {g["momentum"] for g in opt.param_groups} == {0.8}
    assert lr_by_layer(opt)["head"] == 0.2 and lr_by_layer(opt)["block1"] == 0.02
    # the sgd option of the group carries its momentum in YAML
    _, module = build(["model=vit_tiny", "model/optimizer=sgd"])
    opt, _ = optimizers(module)
    assert type(opt) is torch.optim.SGD and {g["momentum"] for g in opt.param_groups} == {0.9}
    # gradual unfreezing still finds every layer in its own group(s)
    layers = {g["layer"] for g in opt.param_groups}
    assert layers == {"head", *module.model.backbone.layer_groups()}


def test_layer_decay_from_config():
    _, module = build(["model=vit_tiny", "model.optimizer.layer_decay=0.5", "model.optimizer.lr=1.0",
                       "model.optimizer.head_lr=3.0"])
    lrs = lr_by_layer(optimizers(module)[0])
    # depth 2: norm 1, block1 0.5, block0 0.25, embeddings 0.125
    assert lrs == {"head": 3.0, "norm": 1.0, "block1": 0.5, "block0": 0.25, "pos_cls": 0.125, "patch_embed": 0.125}


def test_schedulers_by_group_and_their_settings():
    _, module = build(["model=vit_tiny", "model.scheduler.warmup_epochs=0.5", "model.scheduler.min_lr_ratio=0.2"])
    sched = optimizers(module)[1]["scheduler"]
    fn = sched.lr_lambdas[0]
    # one step in one epoch: round(0.5 * 1) = 0 warmup steps; the floor is min_lr_ratio
    assert (fn.warmup_steps, fn.total_steps, fn.min_ratio) == (0, 1, 0.2)
    _, module = build(["model=vit_tiny", "model/scheduler=plateau", "model.scheduler.patience=7",
                       "model.scheduler.monitor=val/bal_acc", "model.scheduler.mode=max"])
    sched = optimizers(module)[1]
    assert (sched["scheduler"].patience, sched["scheduler"].mode, sched["monitor"]) == (7, "max", "val/bal_acc")
    _, module = build(["model=vit_tiny", "model/scheduler=none"])
    assert isinstance(module.configure_optimizers(), torch.optim.AdamW)


def test_the_old_scheduler_switch_says_what_to_write_now():
    with pytest.raises(ValueError, match=r"model\.scheduler\.name=plateau is no longer read.*model/scheduler=plateau"):
        optimizers(build(["model=vit_tiny", "model.scheduler.name=plateau"])[1])
    # a checkpoint written before holds the old spellings in its hparams: it still loads (to predict),
    # and only training from it asks for the new one
    cfg = compose_cfg(["model=vit_tiny", *TINY], Path("/tmp/unused"))
    old = LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True), dataset_name="dermmel",
                           class_names=CLASSES, optimizer={"lr": 1e-4, "head_lr": None, "weight_decay": 0.05},
                           scheduler={"name": "cosine", "warmup_epochs": 1.0})
    with pytest.raises(ValueError, match="model/scheduler=cosine"):
        old.configure_optimizers()


def test_a_missing_yaml_value_is_an_error_not_a_code_default():
    cfg, _ = build(["model=vit_tiny"])
    for key in ("lr", "head_lr", "weight_decay", "group_lr", "layer_decay"):
        broken = OmegaConf.to_container(cfg.model.optimizer, resolve=True)
        del broken[key]
        module = LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True),
                                  dataset_name="dermmel", class_names=CLASSES, optimizer=broken,
                                  scheduler=OmegaConf.to_container(cfg.model.scheduler))
        with pytest.raises(KeyError, match=f"model.optimizer.{key} is missing"):
            module.configure_optimizers()
    broken = OmegaConf.to_container(cfg.model.scheduler)
    del broken["interval"]
    module = LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True),
                              dataset_name="dermmel", class_names=CLASSES,
                              optimizer=OmegaConf.to_container(cfg.model.optimizer), scheduler=broken)
    with pytest.raises(KeyError, match="model.scheduler.interval is missing"):
        module.configure_optimizers()
    with pytest.raises(KeyError, match="model.loss lacks"):
        LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True),
                         dataset_name="dermmel", class_names=CLASSES, loss={"class_weights": False})


def test_every_value_of_the_yaml_reaches_the_objects():
    """Change every number the YAML holds and check the objects follow: a code default standing in
    for any of them would keep its own value and fail here."""
    _, module = build(["model=vit_tiny", "model.optimizer.lr=0.011", "model.optimizer.weight_decay=0.013",
                       "model.optimizer.head_lr=0.017", "+model.optimizer.betas=[0.8,0.9]",
                       "+model.optimizer.eps=1e-5", "model.loss.label_smoothing=0.3",
                       "model.backbone.kwargs.drop_path_rate=0.25"])
    opt, _ = optimizers(module)
    assert opt.defaults["lr"] == 0.011 and opt.defaults["betas"] == (0.8, 0.9) and opt.defaults["eps"] == 1e-5
    assert lr_by_layer(opt)["head"] == 0.017 and {g["weight_decay"] for g in opt.param_groups} == {0.0, 0.013}
    logits, y = torch.tensor([[2.0, -1.0], [0.5, 0.25]]), torch.tensor([0, 1])
    assert module._loss(logits, y) == pytest.approx(F.cross_entropy(logits, y, label_smoothing=0.3).item())
    assert module.model.backbone.blocks[1].drop_path.drop_prob == 0.25


@pytest.mark.parametrize("name", MODELS)
def test_the_deit_dims_come_from_the_presets(name):
    cfg = compose_cfg([f"model={name}"], Path("/tmp/unused"))
    kwargs = cfg.model.backbone.kwargs
    assert (kwargs.patch_size, kwargs.embed_dim, kwargs.depth, kwargs.num_heads) == (None, None, None, None)
    with torch.device("meta"):
        module = LesionClassifier(backbone=OmegaConf.to_container(cfg.model.backbone, resolve=True),
                                  dataset_name="dermmel", class_names=CLASSES)
    vit = module.model.backbone
    assert (vit.embed_dim, vit.depth, len(vit.blocks), vit.blocks[0].attn.num_heads) == (
        PRESETS[name]["embed_dim"], PRESETS[name]["depth"], PRESETS[name]["depth"], PRESETS[name]["num_heads"])
    assert vit.patch_embed.patch_size == (16, 16)
    assert cfg.model.pretrained == f"deit_{name[4:]}_patch16_224"


@pytest.mark.parametrize("name", DATASETS)
def test_augment_defaults_have_one_home(name, tmp_path):
    cfg = compose_cfg([f"dataset={name}", f"paths.data_dir={tmp_path}"], Path("/tmp/unused"))
    dm = instantiate_dataset(cfg.dataset)  # a joint config's members are composed there
    expected = resolve_augment(None)
    if name == "synthetic":  # its own crop and jitter, over the shared defaults
        expected.update(scale=[0.7, 1.0], ratio=[0.9, 1.1])
        expected["color_jitter"].update(p=0.5, saturation=0.1)
    assert dm.augment == expected
    assert expected["hflip"] == DEFAULT_AUGMENT["hflip"] == 0.5 and expected["interpolation"] == "bicubic"


def test_augment_overrides_keep_working(tmp_path):
    cfg = compose_cfg(["dataset=dermmel", f"paths.data_dir={tmp_path}", "dataset.augment.hflip=0.2",
                       "dataset.augment.color_jitter.p=0.0", "dataset.augment.interpolation=bilinear"],
                      Path("/tmp/unused"))
    aug = instantiate(cfg.dataset, _convert_="all").augment
    assert aug["hflip"] == 0.2 and aug["color_jitter"]["p"] == 0.0 and aug["interpolation"] == "bilinear"
    assert aug["vflip"] == 0.5 and aug["color_jitter"]["brightness"] == 0.2


def test_the_optuna_search_space_names_keys_that_exist():
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    assert set(params) == {"model.optimizer.lr", "model.optimizer.head_lr", "model.optimizer.weight_decay",
                           "model.loss.label_smoothing"}
    for key in params:
        assert isinstance(OmegaConf.select(cfg, key, default="missing"), float), key
