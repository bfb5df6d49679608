import pytest
import torch

from melanoma.conventions import positive_index
from melanoma.models.heads import DatasetHeads, LinearHead, MLPHead, build_head

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]


def test_linear_head_shapes_and_spec():
    head = LinearHead(32, ["not_melanoma", "melanoma"], dropout=0.1)
    assert head(torch.randn(5, 32)).shape == (5, 2)
    assert head.class_names == ["not_melanoma", "melanoma"] and head.num_classes == 2
    assert head.spec() == {"type": "linear", "in_features": 32,
                           "class_names": ["not_melanoma", "melanoma"], "dropout": 0.1}


def test_mlp_head_is_linear_relu_dropout_linear():
    head = MLPHead(32, HAM)
    assert head.spec() == {"type": "mlp", "in_features": 32, "class_names": HAM,
                           "hidden_features": 64, "dropout": 0.0}
    assert (head.fc1.in_features, head.fc1.out_features, head.fc2.out_features) == (32, 64, 7)
    x = torch.randn(4, 32)
    expected = head.fc2(torch.relu(head.fc1(x)))
    assert torch.allclose(head(x), expected)


@pytest.mark.parametrize("head", [LinearHead(16, ["a", "b", "c"], dropout=0.2),
                                  MLPHead(16, ["x", "mel"], hidden_features=8, dropout=0.3)])
def test_spec_round_trip_rebuilds_same_head(head):
    rebuilt = build_head(head.spec())
    assert type(rebuilt) is type(head) and rebuilt.spec() == head.spec()
    rebuilt.load_state_dict(head.state_dict(), strict=True)
    x = torch.randn(3, 16)
    assert torch.equal(rebuilt.eval()(x), head.eval()(x))


def test_build_head_rejects_bad_specs():
    with pytest.raises(ValueError, match="'type'"):
        build_head({"type": "conv", "in_features": 3, "class_names": ["a", "b"]})
    with pytest.raises(ValueError, match="invalid linear head spec"):
        build_head({"type": "linear", "in_features": 3, "class_names": ["a", "b"], "hidden": 3})
    with pytest.raises(ValueError, match="unique"):
        LinearHead(4, ["a", "a"])
    with pytest.raises(TypeError, match="list of names"):
        LinearHead(4, "ab")


def test_dataset_heads_add_refuses_duplicates_unless_replace():
    heads = DatasetHeads()
    first = heads.add("ham10000", MLPHead(32, HAM))
    assert heads["ham10000"] is first
    with pytest.raises(ValueError, match=r"'ham10000' already exists.*replace=True"):
        heads.add("ham10000", LinearHead(32, ["a", "b"]))
    assert heads["ham10000"] is first
    second = heads.add("ham10000", LinearHead(32, ["a", "b"]), replace=True)
    assert heads["ham10000"] is second and len(heads) == 1


def test_dataset_heads_specs_round_trip_with_state_dict():
    heads = DatasetHeads()
    heads.add("dermmel", LinearHead(32, ["not_melanoma", "melanoma"]))
    heads.add("ph2", MLPHead(32, ["common_nevus", "atypical_nevus", "melanoma"], hidden_features=16))
    specs = heads.specs()
    assert list(specs) == ["dermmel", "ph2"] and specs["ph2"]["hidden_features"] == 16
    again = DatasetHeads.from_specs(specs)
    assert again.specs() == specs
    again.load_state_dict(heads.state_dict(), strict=True)
    assert set(heads.state_dict()) == {"dermmel.fc.weight", "dermmel.fc.bias", "ph2.fc1.weight",
                                       "ph2.fc1.bias", "ph2.fc2.weight", "ph2.fc2.bias"}
    x = torch.randn(2, 32)
    assert torch.equal(again["ph2"](x), heads["ph2"](x))


def test_positive_index():
    assert positive_index(["not_melanoma", "melanoma"]) == 1
    assert positive_index(HAM) == 4
    assert positive_index(["common_nevus", "atypical_nevus", "melanoma"]) == 2
    assert positive_index(["Melanoma", "NotMelanoma"]) == 0
    assert positive_index(["MEL", "NV"]) == 0
    assert positive_index(["nv", "bcc"]) is None
    assert positive_index(["not_melanoma", "benign"]) is None
