import math

import pytest
import torch

from encodenet_timm.representatives import Representatives, pick_representatives, softmax_entropy


def test_entropy_matches_definition():
    torch.manual_seed(0)
    logits = torch.randn(50, 7) * 3
    p = torch.softmax(logits.double(), 1)
    expected = -(p * p.log()).sum(1)
    torch.testing.assert_close(softmax_entropy(logits).double(), expected, rtol=1e-5, atol=1e-6)
    # uniform -> log K, one-hot-ish -> ~0
    assert softmax_entropy(torch.zeros(1, 7)).item() == pytest.approx(math.log(7), rel=1e-6)
    assert softmax_entropy(torch.tensor([[100.0, 0.0, 0.0]])).item() < 1e-6


def test_representative_is_min_entropy_member_brute_force():
    torch.manual_seed(0)
    n, m = 500, 23
    cluster_ids = torch.randint(0, m, (n,))
    cluster_ids[:m] = torch.arange(m)  # every cluster has a member
    entropy = softmax_entropy(torch.randn(n, 10) * 2)
    reps = pick_representatives(cluster_ids, entropy, m)
    for c in range(m):
        members = [i for i in range(n) if cluster_ids[i] == c]
        best = min(members, key=lambda i: (entropy[i].item(), i))
        assert reps[c].item() == best


def test_ties_pick_the_lowest_index():
    cluster_ids = torch.tensor([0, 1, 0, 1, 0])
    entropy = torch.tensor([0.5, 0.2, 0.1, 0.2, 0.1])
    assert pick_representatives(cluster_ids, entropy, 2).tolist() == [2, 1]


def test_empty_cluster_is_an_error():
    with pytest.raises(ValueError, match=r"clusters \[2\]"):
        pick_representatives(torch.tensor([0, 1, 1]), torch.rand(3), 3)


def test_save_load_round_trip(tmp_path):
    reps = Representatives(labels=torch.tensor([0, 0, 1]), cluster_ids=torch.tensor([0, 0, 1]),
                           entropy=torch.rand(3), rep_indices=torch.tensor([1, 2]),
                           cluster_labels=torch.tensor([0, 1]), images=torch.randn(2, 3, 8, 8))
    reps.save(tmp_path / "reps.safetensors")
    back = Representatives.load(tmp_path / "reps.safetensors")
    for k in reps.__dataclass_fields__:
        assert torch.equal(getattr(reps, k), getattr(back, k))
    assert back.target_indices.tolist() == [1, 1, 2]


def test_load_rejects_other_files(tmp_path):
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a Representatives file"):
        Representatives.load(tmp_path / "other.safetensors")
