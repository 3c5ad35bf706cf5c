"""Fine-tuning over HTTP: uploaded training files (``files``, ``dataset``), jobs and their
events and checkpoints in SQLite (``jobs``), the checks a new job passes (``params``,
``service``), and the thread that runs jobs on the engine and registers what they produce
(``manager``)."""
