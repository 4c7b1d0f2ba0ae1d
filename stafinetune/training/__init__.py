"""Training: the loop and everything it owns.

``trainer`` (the loop: step, log, validate, checkpoint), ``distill`` (one step's losses),
``optim`` (AdamW, schedule, EMA, the trainable set), ``lora`` (adapters and their export),
``checkpoint`` (the pickle-free checkpoint format), ``resume`` (which checkpoint a run
continues from, and what may change), ``preemption`` (SIGTERM to a clean stop),
``validation`` (the ``val/*`` metrics and sample videos), ``tracking`` (wandb or nothing) and
``figures`` (the end-of-run PNGs).
"""
