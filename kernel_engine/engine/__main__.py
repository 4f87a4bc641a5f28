"""``python -m kernel_engine.engine -f CONNECTION_FILE``: run one engine kernel."""

from kernel_engine.engine.app import main

if __name__ == "__main__":
    main()
