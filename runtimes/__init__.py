"""Code that runs inside Triton's Python backend. Copied into each compiled model's version directory, so it
imports nothing from the rest of Sluice."""
