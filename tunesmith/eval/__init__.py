"""Evaluation. Import from the modules (this package imports nothing, so `tunesmith eval` checks its config
before torch loads):

    metrics    exact match, ROUGE-L, BLEU, chrF, numeric match, answer extraction, streamed accumulators
    loglik     multiple choice by option log-likelihood (length-normalised per token or per character)
    prompting  zero-shot, k-shot and chain-of-thought prompts, chat template or plain text
    generate   batched greedy or sampled generation with stop tokens
    items      eval set files -> items (question, reference, options)
    sets       an eval set as plain values
    harness    one set on one model, streamed: loss, choice, generate, classify; `generation_metrics` for
               training
    classifiers  text classifiers (feature-based runs, classification heads) as the harness scores them
    models     load a model, a PEFT adapter, a ReFT run, a checkpoint or a classifier, and its baseline
    report     eval.json and eval.md, deltas and forgetting
    command    `tunesmith eval`
"""
