"""``python -m stafinetune.search``: the ``stafinetune-search`` command (``stafinetune.search_cmd``)."""

from stafinetune.search_cmd import main

if __name__ == "__main__":
    main()
