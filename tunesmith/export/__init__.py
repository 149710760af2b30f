"""Delivery of a tuned model: load what a user names (model, run or adapter), merge adapters, export to a
Hugging Face directory or a GGUF file.

    model, tokenizer = load_model_and_tokenizer("runs/x")          # base + adapter, ready to generate
    merge_command("runs/x", "merged/")                              # standalone model + merge_report.json
    export_command("merged/", "model.gguf", fmt="gguf", quant="q8_0")
"""
