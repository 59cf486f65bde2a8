"""ToyGPT's library: everything the commands at the repository root (train.py, quantize.py, push_to_hub.py,
convert_gpt2.py) call. The model itself is the three remote-code files beside them, which travel to the Hub."""
