"""Prompt methods: prompt tuning, P-tuning and prefix tuning (virtual tokens before the input)."""
