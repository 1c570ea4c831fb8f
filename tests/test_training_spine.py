"""Adding a method is one subclass of the spine (docs/architecture.md): its extra loss term goes through
ObjectiveMix, its extra parameters into the one AdamW and the one schedule, and export/resume keep working."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from paraencoder.train.data import AlignmentData
from paraencoder.train.module import AlignmentModule


class SoftTokenPenalty(AlignmentModule):
    """A toy method: an L2 penalty on the (learnably scaled) soft tokens, and the scale as its own parameter group."""

    def __init__(self, *, penalty: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        self.scale = torch.nn.Parameter(torch.ones(()))

    def extra_terms(self, batch, soft, cue_logits):
        terms, logs = super().extra_terms(batch, soft, cue_logits)
        terms["penalty"] = (self.hparams.penalty, (soft[0] * self.scale).pow(2).mean())
        return terms, logs

    def param_groups(self):
        return super().param_groups() + [{"params": [self.scale], "weight_decay": 0.0, "lr": 10 * self.hparams.lr}]


@pytest.fixture()
def parts(tiny_llm_dir, tiny_whisper_dir, toy_corpus, tmp_path):
    module = SoftTokenPenalty(llm=str(tiny_llm_dir), encoder=str(tiny_whisper_dir), stack=2, projector_dim=64, lr=3e-3, warmup_steps=1,
                              cache_encoder=False, penalty=0.25, export_dir=str(tmp_path / "adapter"))
    data = AlignmentData(train_manifest=str(toy_corpus / "manifest.jsonl"), tasks=["emotion"], llm=str(tiny_llm_dir), batch_size=3,
                         teacher_cache=str(tmp_path / "teacher"), teacher_max_new_tokens=4, bucket=False)
    return module, data


def test_a_new_methods_loss_term_is_summed_by_the_one_objective(parts):
    module, data = parts
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        total, logged = module.compute_loss(batch)
    assert {"ce", "penalty"} <= set(logged)
    assert total.item() == pytest.approx(logged["ce"].item() + 0.25 * logged["penalty"].item(), rel=1e-6)


def test_a_new_methods_parameters_train_under_the_one_schedule_and_export(parts, tmp_path):
    module, data = parts
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, data)
    optimizer = trainer.optimizers[0]
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(optimizer, torch.optim.AdamW) and len(scheduler.lr_lambdas) == len(optimizer.param_groups)
    scale_group = next(g for g in optimizer.param_groups if any(p is module.scale for p in g["params"]))
    # warm-up then cosine, the same multiplier for every group: the new group keeps its 10x base rate.
    assert scale_group["lr"] == pytest.approx(10 * optimizer.param_groups[0]["lr"])
    assert module.scale.item() != 1.0  # it trained
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()  # on_train_end exported through the spine
