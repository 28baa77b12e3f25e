"""The merge math of each PEFT method, one file each: tensors in, tensors out, bit-identical to PEFT."""
