"""Token datasets: the tokenize job's shard writer and the per-process training reader.

* ``tokenize.py`` — the ``tokenize`` job (``run(config, workdir)``): ImageFolder / TFDS ImageNet →
  official views (``preprocess.py``) → tokenizer (``tokenizers.py``) → ArrayRecord shards
  (``writer.py``, records in ``records.py``).
* ``reader.py`` — ``make_dataset`` / ``make_train_iterator``: this process's slice of every global
  batch, exactly resumable (``get_state``/``set_state``), with metadata and bad-data checks.
* ``digits.py`` — scikit-learn's digits as images and through the same writer (demo).
"""

from cca_jax.data.reader import (BadDataError, MetadataMismatchError, TokenIterator,  # noqa: F401
                                 check_metadata, make_dataset, make_global_batch,
                                 make_train_iterator, rows_for_sharding)
