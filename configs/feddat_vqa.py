"""FedDAT (Chen et al. 2024) on digit VQA: clients differ in domain (question family).

The real all-MiniLM-L6-v2 reads each digit image as 16 patch tokens after the question (fresh
patch embeddings, trained and shared; the pretrained text embeddings and encoder stay frozen) and
answers from a fixed set ("0".."9", "yes", "no"). Every client asks one question family
("which digit is this?", "is it even?", "is it greater than five?", "is it a prime?"), the
domain shift of the paper's setting. Three adapters per layer: personal A_c, shared A_s, the
frozen copy of A_s; personal heads.

  python launch.py --config configs/feddat_vqa.py --workdir runs/feddat_vqa
  python launch.py --config configs/feddat_vqa.py:tiny
  python launch.py --config configs/feddat_vqa.py --config.algorithm.name=fedavg \\
      --config.algorithm.hparams="{'client_lr': 0.5}" --config.model.personal="()"
"""

import ml_collections

from configs import feddat_text


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = feddat_text.get_config(arg)
  c.data = ml_collections.ConfigDict(dict(
      name="digits_vqa", test_fraction=0.2, max_length=16,
      families=("identity", "parity", "greater_than_five", "prime"),
      partition=dict(kind="iid", num_clients=2)))   # clients per family
  c.model.image = dict(image_size=8, patch_size=2, num_channels=1)
  c.model.trainable = ("adapters/personal", "adapters/shared", "head", "image_embeddings")
  if arg == "tiny":
    c.data.families = ("identity", "parity")
    c.data.partition.num_clients = 2
    c.cohort_size = 2
  return c
