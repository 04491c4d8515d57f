"""Inference of domain contexts: image style descriptors, their online assignment to contexts, and routing."""
