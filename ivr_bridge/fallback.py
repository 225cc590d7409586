"""Where a call goes when the voice API cannot serve it: never dead air."""

from __future__ import annotations

from twilio.twiml.voice_response import VoiceResponse

from ivr_bridge.settings import Settings

APOLOGY = "Sorry, our assistant is not available right now. Please call again later."


def fallback_twiml(settings: Settings) -> str:
    """TwiML for a call the bridge cannot serve: `<Dial>` the fallback number, `<Redirect>`
    to the fallback TwiML, or an apology and a polite hang-up."""
    response = VoiceResponse()
    if settings.fallback_number:
        response.dial(settings.fallback_number)
    elif settings.fallback_twiml_url:
        response.redirect(settings.fallback_twiml_url, method="POST")
    else:
        response.say(APOLOGY)
        response.hangup()
    return str(response)
