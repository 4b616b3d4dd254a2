"""What crosses the process boundary: messages, the codec, errors and request validation.

Shared by the driver and the workers; imports nothing of fastvideo above it.
"""
