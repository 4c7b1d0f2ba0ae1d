"""The five commands: Hydra composition at the edge, explicit arguments below.

Each module here turns one root config (``conf/<name>.yaml``) into a run of the library:
``train`` (distil or finetune), ``sample`` (prompts to videos), ``eval`` (score videos or
compare models), ``search`` (training-free window search) and ``preprocess`` (build the latent
cache). They are the console scripts ``stafinetune-<name>`` and ``python -m stafinetune
<name>``. Nothing outside this package imports it: library code raises
:class:`~stafinetune.errors.UserError` and :mod:`.cli` turns it into one line and exit code 2.
"""

COMMANDS = {
    "train": "distil (or finetune) a video DiT: the trainer",
    "sample": "generate videos from prompts with a model, a checkpoint or an export",
    "eval": "score a folder of videos, or compare models on one prompt set",
    "search": "training-free search of the STA window of every step, layer and head",
    "preprocess": "encode videos and captions once into the latent cache",
}
