"""benchmarks/llm_plan.py: the AOT-compiled plan of a federated LoRA round of a decoder LM."""

import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import llm_plan  # noqa: E402  pylint: disable=wrong-import-position


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")
def test_tiny_plan_on_8_devices_shards_backbone_and_grows_with_cohort():
  # Cheapest program that still has every part: sgd (no optimizer moments to compile), LoRA on
  # q and v only (fewer branches), one step of one 16-token example per client; the mesh is the
  # default 1 x 8 (fsdp = 8). Two compiles, about 10 s each on a 2-core CPU.
  base = dict(model="tiny", lora_rank=4, lora_targets=("q", "v"), batch=1, seq=16,
              local_steps=1, devices=8, client_optimizer="sgd", loss_chunk=16)
  small = llm_plan.plan_record(llm_plan.PlanSpec(cohort=2, **base))
  large = llm_plan.plan_record(llm_plan.PlanSpec(cohort=8, **base))
  for rec in (small, large):
    assert rec["mesh_axes"] == {"clients": 1, "fsdp": 8}
    for field in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes",
                  "backbone_bytes", "lora_bytes", "model_flops", "hardware_flops",
                  "xla_flops_loop_bodies_once", "compile_s"):
      assert rec[field] > 0, field
    # The frozen backbone is split over fsdp: a device holds less than the whole backbone.
    assert rec["argument_bytes"] < rec["backbone_bytes"]
    assert rec["hardware_flops"] > rec["model_flops"]
    assert set(rec["fits"]) == set(llm_plan.CHIPS) and all(rec["fits"].values())
  # Per-client data and LoRA / optimizer copies carry the cohort axis.
  assert large["argument_bytes"] > small["argument_bytes"]
  assert large["temp_bytes"] > small["temp_bytes"]
  assert large["model_flops"] == 4 * small["model_flops"]
  assert "| tiny | 1 x 8 | 8 |" in llm_plan.table([small, large])
