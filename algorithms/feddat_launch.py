"""FedDAT's builder: config -> the algorithm over an adapter model, and its two evaluations.

FedDAT calls the model with different adapter mixes, so it is wired with the model's graphdef
rather than one loss (`fedjax_fm.algorithms.feddat.model_logits_fn`). The model's adapters are
named ``(local A_c, global A_s, frozen copy Ā_s)`` by ``config.model.adapters.names``
(`configs/feddat_text.py`). Evaluation uses the DAT mix (personalized: A_c with Ā_s and the
client's head) and A_s alone (global, heads averaged).
"""

from __future__ import annotations

from fedjax_fm.algorithms import feddat as feddat_lib
from fedjax_fm.algorithms import feddat_decoder
from fedjax_fm.builders import Built, Federation, ModelBundle, chain_config, read_hparams
from fedjax_fm.evaluate import make_evaluator

HPARAMS = ("client_lr", "teacher_weights", "temperature", "distill", "mutual_distillation",
           "weighted")


def build(config, model: ModelBundle, data: Federation, execution) -> Built:
  """`fedjax_fm.builders.AlgorithmBuilder` of ``algorithm.name = "feddat"``: AdamW clients
  (the reference's optimizer) at ``client_lr``; labels under ``y``."""
  if config.model.name == "decoder":  # three LoRA adapters instead of bottleneck ones
    return feddat_decoder.build(config, model, data, execution)
  hp = read_hparams(config, HPARAMS)
  names = tuple(config.model.adapters.names)
  task = feddat_lib.classification_task_loss("y")
  alg = feddat_lib.feddat(
      feddat_lib.model_logits_fn(model.graphdef, model.input_keys), model.roles, model.params,
      task_loss=task, adapter_names=names,
      client_optimizer=feddat_lib.default_client_optimizer(hp["client_lr"]),
      teacher_weights=tuple(hp["teacher_weights"]), temperature=hp["temperature"],
      distill=hp["distill"],
      mutual_distillation=hp["mutual_distillation"], weighted=hp["weighted"],
      aggregation=chain_config(config, data.train.num_clients), execution=execution)
  mixes = feddat_lib.adapter_weights_by_mode(names, tuple(hp["teacher_weights"]))
  eval_logits = feddat_lib.model_logits_fn(model.graphdef, model.input_keys, train=False)
  personal = make_evaluator(feddat_lib.adapter_mix_loss(eval_logits, task, mixes["dat"]),
                            data.test, modes=("personalized",))
  global_ = make_evaluator(feddat_lib.adapter_mix_loss(eval_logits, task, mixes["global"]),
                           data.test, modes=("global",))
  return Built(alg, lambda server_params, clients: {**personal(server_params, clients),
                                                    **global_(server_params, clients)})


build.hparams = HPARAMS
