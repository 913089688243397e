"""controls: the distillation control's BatchNorm handling, the divergence guard, the exact budget loader."""
import math

import pytest
import timm
import torch
from torch.utils.data import DataLoader, TensorDataset

from encodenet_timm.controls import DistillationTask, budget_loader, divergence, train_seconds


def _pair():
    torch.manual_seed(0)
    teacher = timm.create_model("resnet20_cifar", num_classes=10)
    with torch.no_grad():  # running statistics unlike a batch's, as after training
        for m in teacher.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    student = timm.create_model("resnet20_cifar", num_classes=10)
    student.load_state_dict(teacher.state_dict())
    return teacher.eval().requires_grad_(False), student


def test_a_student_with_frozen_batchnorm_starts_at_zero_kl_and_keeps_its_statistics():
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    teacher, student = _pair()
    frozen = DistillationTask(student, teacher_model=teacher, verbose=False, temperature=4.0, task_loss_weight=0.3,
                              student_bn="eval").train()
    assert float(frozen(x, y)["kd_loss"].detach()) == pytest.approx(0.0, abs=1e-6)  # the same function as the teacher
    bn = next(m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    frozen(x, y)
    assert torch.equal(bn.running_mean, before) and not bn.training and student.training
    teacher, student = _pair()
    timm_like = DistillationTask(student, teacher_model=teacher, verbose=False, temperature=4.0,
                                 task_loss_weight=0.3).train()  # timm's behaviour: batch statistics
    assert float(timm_like(x, y)["kd_loss"].detach()) > 0.01
    with pytest.raises(ValueError, match="student_bn"):
        DistillationTask(student, teacher_model=teacher, verbose=False, student_bn="frozen")


def test_divergence_names_a_rising_loss_or_a_falling_accuracy_and_nothing_else():
    steady = [{"loss": 0.05, "accuracy": 0.99}, {"loss": 0.04, "accuracy": 0.995}]
    assert divergence(steady, start_accuracy=0.995) is None
    rising = [{"loss": 0.14, "accuracy": 0.99}, {"loss": 6.7, "accuracy": 0.63}]  # the audit's kd row
    assert divergence(rising).startswith("training loss rose from 0.140 (epoch 1) to 6.700 (epoch 2)")
    falling = [{"loss": 0.05, "accuracy": 0.97}, {"loss": 0.05, "accuracy": 0.96}]
    assert "accuracy fell from 0.995 to 0.960" in divergence(falling, start_accuracy=0.995)
    blown = [{"loss": 8.0, "accuracy": 0.12}]  # from the first epoch on: only the baseline's loss shows it
    assert divergence(blown) is None and "the baseline's last epoch" in divergence(blown, start_loss=2.3)
    assert divergence([{"loss": math.nan, "accuracy": 0.5}], start_loss=1.0)
    # a few images of noise on a tiny training set is not a collapse: the drop must exceed 3 standard errors
    tiny = [{"loss": 2.3, "accuracy": 0.10}, {"loss": 2.3, "accuracy": 0.06}]
    assert divergence(tiny, start_accuracy=0.10, images=100) is None
    assert divergence(tiny, start_accuracy=0.10, images=100_000) is not None


def test_the_budget_loader_sees_exactly_the_images_it_is_given():
    like = DataLoader(TensorDataset(torch.arange(100).float(), torch.zeros(100)), batch_size=10)
    loader, epochs = budget_loader(like, 250.0, seed=0)
    assert epochs == 3 and len(loader.sampler) == 83  # round(250 / 3) a epoch, without replacement within one
    seen = [int(v) for x, _ in loader for v in x]
    assert len(seen) == 83 and len(set(seen)) == 83


def test_train_seconds_sums_every_epoch_of_every_stage():
    """A row resumed after a stop keeps the stopped process's epochs in its history: they count."""
    assert train_seconds([{"epoch": 0, "seconds": 60.5}, {"epoch": 1, "seconds": 70.0}]) == 130.5
    assert train_seconds({"autoencoder": [{"seconds": 10.0}] * 3, "transfer": [{"seconds": 2.0}],
                          "representatives": {"seconds": 99.0}}) == 32.0  # stages that are lists of epochs
    assert train_seconds(None) == 0.0 and train_seconds([]) == 0.0
