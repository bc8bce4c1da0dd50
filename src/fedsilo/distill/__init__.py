"""Knowledge distillation: expert adapters distilled into one master adapter.

Each expert is a LoRA adapter on the same base model (for example one per cluster of sites).
The master is a fresh LoRA adapter trained on a public transfer set to match, on every answer
token, the temperature-softened next-token distribution of the expert that the router picks
for that example (see docs/distillation.md).
"""
