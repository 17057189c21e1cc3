"""`onnxserve tune`: the configuration of one repository model that serves the most
inferences per second while p99 stays within a latency budget, measured on this machine.

A run goes through named phases (benchmarks/tune/command.py):

1. ``costs``: what is cheap to measure, with nothing served: raw onnxruntime's latency per
   batch size and thread count for the model and each of its variants (``variants``), and a
   do-nothing server's per-request cost (``costs``);
2. ``search``: the configurations those figures predict to do best within the budget
   (``search``: prediction and pruning, then one knob at a time around the best measured),
   each served and measured (``measure``: a load sweep per configuration);
3. ``confirm``: the finalists and the model's own configuration measured again in turns,
   for the run-to-run spread; a winner is called only outside it (``decide``);
4. ``report``: tune.md, tune.json, tune.png and the chosen config.pbtxt (``report``).
"""


class TuneError(RuntimeError):
    """Tuning cannot go on; the message says what is wrong and what was expected."""
