"""The pocket world: a text-to-image world small enough for a CPU, with an exact gold reward.

* :mod:`.grammar` — prompts ⇄ structured specs (``parse_prompt``, ``spec_to_prompt``, ``PromptSpec``)
* :mod:`.render` — seeded, anti-aliased, batched scene renderer (``render_scene``, ``render_batch``)
* :mod:`.prompts` — the train / held-out test prompt sets under ``prompts/pocket/``
* :mod:`.evaluate` — the exact evaluator and gold reward (``evaluate``, ``PocketGold``)
* :mod:`.cli` — ``flowalign pocket ...``
"""
