"""`python -m latentdiff ...`, the CLI; what `accelerate launch -m latentdiff generate --prompts ...` runs."""
from .cli import main

if __name__ == "__main__":
    main()
