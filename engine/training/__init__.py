"""LoRA training on the loaded base model: the trainable layers (``lora``), the forward pass and
loss over a training view of the model (``model``), examples and batches (``data``), the
optimizer step with accumulation and schedule (``trainer``), what a job needs in memory
(``memory``), and the unit of work the engine thread interleaves with serving (``work``)."""
