"""The built-in toy default: `python -m moellava.demo` (`make demo`) trains a tiny MoE-LLaVA through the three
stage scripts on synthetic coloured shapes and evaluates it on held-out images (see `run.py`)."""
