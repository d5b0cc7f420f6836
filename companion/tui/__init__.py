"""The Textual UI of companion: chat, live learning status, history, learned preferences.

Layout follows the Textual apps people admire (Harlequin, Posting, Elia):
``app.py`` (the App), ``app.tcss`` (all styling), ``keymap.py`` (every key in
one place), ``screens/`` and ``widgets/`` with one class per file. UI-free
logic lives beside them so the plain console chat and the CLI tables reuse it:
``controller.py`` (a conversation and its turns), ``status.py`` (link/learning
state events), ``grouping.py`` (hint grouping with sentence embeddings) and
``data.py`` (history and preference queries over the journal).
"""
