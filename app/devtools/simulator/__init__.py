"""Twilio call simulator: behaves towards our service exactly as Twilio does (used by e2e tests and the demo)."""
from app.devtools.simulator.audio import read_wav_as_ulaw, speech_like_tone, write_ulaw_as_wav
from app.devtools.simulator.twilio import CallResult, SimulatedStream, TwilioCallSimulator, new_sid

__all__ = ["CallResult", "SimulatedStream", "TwilioCallSimulator", "new_sid",
           "read_wav_as_ulaw", "speech_like_tone", "write_ulaw_as_wav"]
