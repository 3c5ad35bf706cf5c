"""LoRA on the device: the request-side type that names an adapter (``request``), the slot table
the scheduler keeps (``slot_table``), and the stacked A/B weights the model runner writes and every
adapted projection reads (``device``, ``layers``)."""
