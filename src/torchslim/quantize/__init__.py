"""torchslim.quantize (re-exports are filled in as the technique lands)."""
