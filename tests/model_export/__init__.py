"""Tests of the model team pipeline (model_export) and the shared artifact format."""
