from altp2m_replay.cli import main

if __name__ == "__main__":
    main()
