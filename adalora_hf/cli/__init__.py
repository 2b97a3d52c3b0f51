"""The ``adalora`` command (also ``python -m adalora_hf``).

``adalora demo``
    AdaLoRA vs LoRA vs a linear head on a tiny ViT over scikit-learn's digits, offline, in a
    minute or two on a laptop CPU; writes a PEFT-format adapter and two plots.
``adalora inspect PATH``
    Ranks per module, totals, parameter count and a heatmap of any saved AdaLoRA adapter
    (written here or by PEFT).

Exit codes: 0 on success, 2 for bad arguments or a path that is not an AdaLoRA adapter.

The package needs the ``[demo]`` extra (scikit-learn, matplotlib, tqdm); ``adalora_hf`` itself
never imports it. One module per job:

- ``_commands``: the argument parser, the two commands and ``main``;
- ``_demo``: ``run_demo``, the whole demo, and ``DemoResult`` with its table;
- ``_data``: the digits splits, seeded batches, accuracy;
- ``_backbone``: the tiny ViT ``Recipe``, its pretraining and cache (``pretrained_backbone``);
- ``_runs``: ``DemoSettings`` and the AdaLoRA, LoRA and head-only runs;
- ``_lora``: the plain-LoRA baseline layer and the encoder layers both adapters target;
- ``_inspect``: ``read_adapter`` and ``format_adapter_table`` for a saved adapter;
- ``_plots``: the budget/loss figure and the rank heatmap;
- ``_module_order``: layer and kind of a module name, the order of table rows and heatmap cells.
"""

from ._commands import main as main

__all__ = ["main"]
