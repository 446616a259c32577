"""The PyTorch modeling code that `linjax.save_pretrained` copies into an HF export of a
linearized model (`linjax_spec.FILES`). Only `linjax_spec` is imported by linjax itself
(pure Python); the others need torch and transformers and run as transformers remote code."""
