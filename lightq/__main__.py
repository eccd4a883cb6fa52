"""``python -m lightq [group=option ...]`` — see lightq.app."""

from lightq.app import main

if __name__ == "__main__":
    main()
