"""What the reader shows or speaks, in pt-BR (default) or English."""

from __future__ import annotations

from enum import StrEnum

from .model import Action, Decision, Reason


class Language(StrEnum):
    PT_BR = "pt-BR"
    EN = "en"


_DENIED = {
    Language.PT_BR: {
        Reason.UNKNOWN_CARD: "Acesso negado: cartão desconhecido",
        Reason.SUSPENDED: "Acesso negado: cadastro suspenso",
        Reason.EXPIRED: "Acesso negado: plano vencido",
        Reason.NO_CREDITS: "Acesso negado: sem créditos",
        Reason.OUTSIDE_HOURS: "Acesso negado: fora do horário",
        Reason.COURT_NOT_ALLOWED: "Acesso negado: quadra não liberada no seu plano",
        Reason.ALREADY_IN_SESSION: "Você já está em quadra",
        Reason.CACHE_TOO_OLD: "Acesso negado: lista de sócios desatualizada, procure a recepção",
        Reason.ANTI_PASSBACK: "Aguarde um momento antes de entrar de novo",
        Reason.NO_OPEN_SESSION: "Nenhuma sessão aberta nesta quadra",
        Reason.CLOCK_NOT_SYNCED: "Acesso negado: relógio não sincronizado, procure a recepção",
        Reason.INVALID_REQUEST: "Leitura inválida, tente de novo",
        Reason.UNKNOWN_READER: "Leitor não cadastrado",
        Reason.RATE_LIMITED: "Aguarde um momento",
        Reason.UNAVAILABLE: "Sistema indisponível, procure a recepção",
    },
    Language.EN: {
        Reason.UNKNOWN_CARD: "Access denied: unknown card",
        Reason.SUSPENDED: "Access denied: membership suspended",
        Reason.EXPIRED: "Access denied: membership expired",
        Reason.NO_CREDITS: "Access denied: no credits left",
        Reason.OUTSIDE_HOURS: "Access denied: outside opening hours",
        Reason.COURT_NOT_ALLOWED: "Access denied: court not included in your plan",
        Reason.ALREADY_IN_SESSION: "You are already on court",
        Reason.CACHE_TOO_OLD: "Access denied: member list out of date, please see the front desk",
        Reason.ANTI_PASSBACK: "Please wait a moment before entering again",
        Reason.NO_OPEN_SESSION: "No open session on this court",
        Reason.CLOCK_NOT_SYNCED: "Access denied: clock not synced, please see the front desk",
        Reason.INVALID_REQUEST: "Invalid read, please try again",
        Reason.UNKNOWN_READER: "Reader not registered",
        Reason.RATE_LIMITED: "Please wait a moment",
        Reason.UNAVAILABLE: "System unavailable, please see the front desk",
    },
}

_WELCOME = {Language.PT_BR: "Bem-vindo, {name}!", Language.EN: "Welcome, {name}!"}
_GOODBYE = {Language.PT_BR: "Até logo, {name}!", Language.EN: "See you, {name}!"}
_BAR_PICKED = {Language.PT_BR: "{name}: pedido no bar", Language.EN: "{name}: bar order"}
_BAR_NO_SESSION = {
    Language.PT_BR: "Nenhuma sessão aberta para este cartão",
    Language.EN: "No open session for this card",
}
_CREDITS = {Language.PT_BR: " Créditos: {credits}", Language.EN: " Credits: {credits}"}


def denial_message(reason: Reason, language: Language) -> str:
    return _DENIED[language].get(reason, _DENIED[language][Reason.INVALID_REQUEST])


def message(decision: Decision, first_name: str | None, language: Language) -> str:
    """The one line a person in front of the reader needs."""
    name = first_name or ""
    if decision.action is Action.CHECKIN:
        text = _WELCOME[language].format(name=name)
        if decision.credits_after is not None and decision.cost:
            text += _CREDITS[language].format(credits=decision.credits_after)
        return text
    if decision.action is Action.CHECKOUT:
        return _GOODBYE[language].format(name=name)
    return denial_message(decision.reason, language)


def bar_message(first_name: str | None, found: bool, language: Language) -> str:
    """A tap at a bar reader: whose order the bar tablet now takes, or why nobody's."""
    return _BAR_PICKED[language].format(name=first_name or "") if found else _BAR_NO_SESSION[language]
