"""HL7 v2 in: parse (delimiters, charset, escapes), map (IHE SWF), apply and acknowledge.

The entry point is :func:`worklist.hl7.service.handle_message`; the MLLP adapter
(:mod:`worklist.mllp`) only frames bytes around it.
"""
